"""The WebSocket peers of Gatehouse's tests, with the `websockets` library.

  peer.py server                     an echo server on 127.0.0.1; prints its port, serves until
                                     its stdin closes
  peer.py echo URL N                 sends N messages, prints the echoes as a JSON list
  peer.py wait URL [EVERY_S]         stays connected (sending a message every EVERY_S seconds if
                                     given) until the connection closes; prints the close code,
                                     reason and how long it was open, as JSON
"""

import json
import sys
import threading
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import serve


def server():
    def echo(connection):
        try:
            for message in connection:
                connection.send(message)
        except ConnectionClosed:
            pass

    with serve(echo, "127.0.0.1", 0) as running:
        print(running.socket.getsockname()[1], flush=True)
        threading.Thread(target=running.serve_forever, daemon=True).start()
        sys.stdin.read()
        running.shutdown()


def echo(url, count):
    with connect(url, open_timeout=5) as connection:
        replies = []
        for index in range(count):
            connection.send(f"message {index}")
            replies.append(connection.recv(timeout=5))
    print(json.dumps(replies))


def wait(url, every):
    started = time.monotonic()
    with connect(url, open_timeout=5, ping_interval=None) as connection:
        code, reason = None, None
        try:
            while True:
                if every is None:
                    connection.recv(timeout=30)
                else:
                    connection.send("still here")
                    try:
                        connection.recv(timeout=every)
                        time.sleep(every)
                    except TimeoutError:
                        pass
        except ConnectionClosed as closed:
            if closed.rcvd is not None:
                code, reason = closed.rcvd.code, closed.rcvd.reason
        except TimeoutError:
            code, reason = "timeout", ""
    print(json.dumps({"code": code, "reason": reason, "s": time.monotonic() - started}))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    elif sys.argv[1] == "echo":
        echo(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "wait":
        wait(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        raise SystemExit(__doc__)
