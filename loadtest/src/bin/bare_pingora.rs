//! `bare-pingora`: a Pingora proxy with nothing added, the baseline Gatehouse's own layers are
//! measured against in the side-by-side load run.

use std::sync::Arc;

use async_trait::async_trait;
use clap::Parser;
use pingora::lb::{selection::RoundRobin, LoadBalancer};
use pingora::prelude::*;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;

/// Round-robin HTTP/1.1 proxy over the given upstreams, with no filters.
#[derive(Parser, Debug)]
#[command(name = "bare-pingora", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// Upstream `host:port`; repeat the flag or give a comma list.
    #[arg(long = "upstream", value_delimiter = ',', required = true)]
    upstreams: Vec<String>,
    /// Worker threads of the proxy service.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Bare(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let backend = self
            .0
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ConnectNoRoute, "no upstream"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

fn main() {
    let args = Args::parse();
    let upstreams = LoadBalancer::try_from_iter(&args.upstreams).unwrap_or_else(|error| {
        eprintln!("bare-pingora: bad --upstream {:?}: {error}", args.upstreams);
        std::process::exit(2)
    });
    // Grace period 0 and a 1 s shutdown timeout: SIGTERM ends the process at once, so a
    // benchmark run can start the next contender on a free port.
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None::<Opt>, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare(Arc::new(upstreams)));
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run_forever();
}
