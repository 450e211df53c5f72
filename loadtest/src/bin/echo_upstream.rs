//! `echo-upstream`: the echo server of Gatehouse load runs, on one or more local ports.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use gatehouse_loadtest::{serve, EchoOptions};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// HTTP/1.1 echo upstream for Gatehouse tests and benchmarks.
#[derive(Parser, Debug)]
#[command(name = "echo-upstream", version)]
struct Args {
    /// Address to serve; repeat the flag or give a comma list to serve several ports.
    #[arg(
        long = "listen",
        value_delimiter = ',',
        default_value = "127.0.0.1:9001"
    )]
    listen: Vec<SocketAddr>,
    /// Upstream name reported in replies and in the `x-upstream-name` header.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Benchmark mode: answer every request with 200 and `hello, world`.
    #[arg(long)]
    small: bool,
    /// Benchmark mode: wait this many milliseconds before each answer.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Benchmark mode: answer with a JSON object of this many bytes instead (0: plain text).
    #[arg(long, default_value_t = 0)]
    json_bytes: usize,
    /// Benchmark mode: a gRPC service over HTTP/2 (h2c) answering every call with its message.
    #[arg(long)]
    grpc: bool,
    /// Worker threads; 1 runs everything on the main thread, which is fastest on one core.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("echo-upstream: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let options = EchoOptions {
        name: args.name,
        small: args.small,
        small_delay: std::time::Duration::from_millis(args.delay_ms),
        small_json_bytes: args.json_bytes,
        grpc: args.grpc,
    };
    let mut servers = JoinSet::new();
    for address in &args.listen {
        let listener = match TcpListener::bind(address).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("echo-upstream: cannot listen on {address}: {error}");
                return ExitCode::FAILURE;
            }
        };
        let mode = if options.small { "small" } else { "echo" };
        eprintln!(
            "echo-upstream {} ({mode}) listening on {address}",
            options.name
        );
        servers.spawn(serve(listener, options.clone()));
    }
    while let Some(outcome) = servers.join_next().await {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                eprintln!("echo-upstream: {error}");
                return ExitCode::FAILURE;
            }
            Err(error) => {
                eprintln!("echo-upstream: server task failed: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
