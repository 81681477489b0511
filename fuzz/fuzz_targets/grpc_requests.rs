//! The gRPC services in-process: a sequence of `Ipam` and `Admin` requests (records of a
//! method byte, a little-endian u16 length and that many bytes of protobuf) decoded as
//! tonic would and handed to the real service implementations over a fresh engine whose
//! store keeps nothing. Every refusal must be a status a client can act on, with a message;
//! at the end no address is held twice in a network.
#![no_main]

use std::collections::HashSet;

use ipam_server::allocator::Change;
use ipam_server::authz::Authz;
use ipam_server::engine::Engine;
use ipam_server::grpc::{AdminService, IpamService};
use ipam_server::metrics::Metrics;
use ipam_server::role::Serving;
use ipam_server::store::{CommitError, LeaseStore, Loaded, StoreError};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use rust_ipam_fuzz::check_message;
use rust_ipam_proto::v1 as pb;
use rust_ipam_proto::v1::admin_server::Admin as _;
use rust_ipam_proto::v1::ipam_server::Ipam as _;
use tonic::{Code, Request, Status};

/// A store that accepts every change and keeps none: the engine's answers are what is
/// fuzzed, and durability is the embedded store's own tests' business.
struct Forget;

impl LeaseStore for Forget {
    fn describe(&self) -> String {
        "fuzz".into()
    }
    fn load(&self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }
    fn commit(&mut self, _: &[Change]) -> Result<(), CommitError> {
        Ok(())
    }
}

/// A refusal of bad input or of the state: a code the client can act on, saying why.
fn check_status(s: &Status) {
    assert!(
        matches!(
            s.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::ResourceExhausted
                | Code::FailedPrecondition
        ),
        "unexpected status {s:?}"
    );
    check_message(s.message());
}

/// Decodes `bytes` as `M` (tonic answers undecodable bytes itself) and calls `f` with it.
async fn call<M, R, F>(bytes: &[u8], f: F)
where
    M: Message + Default,
    F: AsyncFnOnce(Request<M>) -> Result<R, Status>,
{
    let Ok(m) = M::decode(bytes) else { return };
    if let Err(s) = f(Request::new(m)).await {
        check_status(&s);
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let engine = Engine::start(Box::new(Forget), Metrics::new()).await.expect("engine");
        let (serving, _role) = Serving::fixed(engine);
        let ipam = IpamService::new(serving.clone(), "fuzz".into(), Authz::off());
        let admin = AdminService::new(serving, Authz::off());
        let mut rest = data;
        while rest.len() >= 3 {
            let method = rest[0];
            let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
            let (msg, tail) = rest[3..].split_at(len);
            rest = tail;
            match method % 10 {
                0 => call(msg, async |r| ipam.allocate(r).await).await,
                1 => call(msg, async |r| ipam.release(r).await).await,
                2 => call(msg, async |r| ipam.check(r).await).await,
                3 => call(msg, async |r| ipam.gc(r).await).await,
                4 => call(msg, async |r| ipam.status(r).await).await,
                5 => call(msg, async |r| admin.list_pools(r).await).await,
                6 => call(msg, async |r| admin.list_leases(r).await).await,
                7 => call(msg, async |r| admin.get_lease(r).await).await,
                8 => call(msg, async |r| admin.reserve(r).await).await,
                _ => call(msg, async |r| admin.release_address(r).await).await,
            }
        }
        // One IP, one holder: page through every lease.
        let mut seen = HashSet::new();
        let mut token = String::new();
        loop {
            let page = admin
                .list_leases(Request::new(pb::ListLeasesRequest {
                    page_token: token.clone(),
                    page_size: 500,
                    ..Default::default()
                }))
                .await
                .expect("list leases")
                .into_inner();
            for l in page.leases {
                assert!(seen.insert((l.network.clone(), l.address.clone())), "held twice: {l:?}");
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    });
});
