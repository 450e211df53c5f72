"""The gRPC peers of Gatehouse's tests: the example service of conf/grpc/echo.proto
(server) and a client that prints the status a call ended with (client). Both read the message
types from a descriptor set, so nothing is generated.

  peer.py server DESCRIPTOR_SET            prints the port it listens on (127.0.0.1), serves
                                           until its stdin closes
  peer.py client DESCRIPTOR_SET TARGET METHOD JSON [--timeout S] [--metadata K=V]... [--stream]
                 [--path P]                sends METHOD's request to path P instead
                                           prints {"code", "details", "replies", "ms"} as JSON
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

PACKAGE = "gatehouse.example"


def load(path):
    files = descriptor_pb2.FileDescriptorSet.FromString(open(path, "rb").read())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


def message(pool, name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


def serve(path):
    pool = load(path)
    SayRequest, SayReply = message(pool, "SayRequest"), message(pool, "SayReply")
    GetItemRequest, Item = message(pool, "GetItemRequest"), message(pool, "Item")
    ListItemsRequest, FailRequest = message(pool, "ListItemsRequest"), message(pool, "FailRequest")

    def reply_to(request, context, text):
        reply = SayReply(text=text, count=request.count, mood=request.mood)
        if request.HasField("when"):
            reply.when.CopyFrom(request.when)
        if request.HasField("wait"):
            reply.wait.CopyFrom(request.wait)
        if request.HasField("limit"):
            reply.limit.CopyFrom(request.limit)
        metadata = dict(context.invocation_metadata())
        reply.authorization = metadata.get("authorization", "")
        remaining = context.time_remaining()
        reply.timeout = "" if remaining is None or remaining > 1e6 else f"{remaining:.3f}"
        return reply

    def say(request, context):
        return reply_to(request, context, request.text)

    def shout(request, context):
        return reply_to(request, context, request.text.upper())

    def slow(request, context):
        time.sleep(request.wait.ToTimedelta().total_seconds())
        return reply_to(request, context, request.text)

    def get_item(request, context):
        return Item(id=request.id, name=f"item {request.id}", view=request.view + request.shelf)

    def list_items(request, context):
        for index in range(request.count):
            yield Item(id=index, name=f"item {index}")

    def fail(request, context):
        context.abort(grpc.StatusCode(next(code for code in grpc.StatusCode if code.value[0] == request.code)), request.message)

    def unary(function, request, reply):
        return grpc.unary_unary_rpc_method_handler(
            function, request_deserializer=request.FromString, response_serializer=reply.SerializeToString)

    echo = {
        "Say": unary(say, SayRequest, SayReply),
        "Slow": unary(slow, SayRequest, SayReply),
        "GetItem": unary(get_item, GetItemRequest, Item),
        "Fail": unary(fail, FailRequest, SayReply),
        "ListItems": grpc.unary_stream_rpc_method_handler(
            list_items, request_deserializer=ListItemsRequest.FromString, response_serializer=Item.SerializeToString),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    handlers = [grpc.method_handlers_generic_handler(f"{PACKAGE}.Echo", echo)]
    try:
        pool.FindServiceByName(f"{PACKAGE}.Extra")
        handlers.append(grpc.method_handlers_generic_handler(
            f"{PACKAGE}.Extra", {"Shout": unary(shout, SayRequest, SayReply)}))
    except KeyError:
        pass
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def call(path, target, method, body, args):
    pool = load(path)
    service, name = method.strip("/").rsplit("/", 1)
    descriptor = pool.FindServiceByName(service).FindMethodByName(name)
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    reply_class = message_factory.GetMessageClass(descriptor.output_type)
    request = json_format.Parse(body, request_class())
    timeout, metadata, stream, path = None, [], False, method
    index = 0
    while index < len(args):
        if args[index] == "--timeout":
            timeout = float(args[index + 1])
            index += 2
        elif args[index] == "--metadata":
            key, value = args[index + 1].split("=", 1)
            metadata.append((key, value))
            index += 2
        elif args[index] == "--path":
            path = args[index + 1]
            index += 2
        elif args[index] == "--stream":
            stream = True
            index += 1
        else:
            raise SystemExit(f"unknown argument {args[index]}")
    channel = grpc.insecure_channel(target)
    started = time.monotonic()
    replies, code, details = [], "OK", ""
    try:
        if stream:
            call = channel.unary_stream(path, request_serializer=request_class.SerializeToString,
                                        response_deserializer=reply_class.FromString)
            for reply in call(request, timeout=timeout, metadata=metadata):
                replies.append(json_format.MessageToDict(reply))
        else:
            call = channel.unary_unary(path, request_serializer=request_class.SerializeToString,
                                       response_deserializer=reply_class.FromString)
            replies.append(json_format.MessageToDict(call(request, timeout=timeout, metadata=metadata)))
    except grpc.RpcError as error:
        code, details = error.code().name, error.details() or ""
    elapsed = (time.monotonic() - started) * 1000
    print(json.dumps({"code": code, "details": details, "replies": replies, "ms": elapsed}))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2])
    elif sys.argv[1] == "client":
        call(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    else:
        raise SystemExit(__doc__)
