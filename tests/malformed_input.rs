//! Every RPC gets malformed input: random bytes where a message should be,
//! and well-formed messages with random, hostile field values. Each answer
//! is a precise error or a normal reply, never a crash, and the server
//! still serves afterwards with its counters intact.

mod common;

use common::{deduct, split, RawCodec, Server};
use packmeter::grpc::proto::{self, Item};
use prost::Message;
use tonic::Code;

/// A seeded generator (fastrand), so a failure replays.
struct Rng(fastrand::Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.u64(..n)
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max)).map(|_| self.next() as u8).collect()
    }
    fn string(&mut self) -> String {
        match self.below(6) {
            0 => String::new(),
            1 => "x".repeat(self.below(300) as usize),
            2 => String::from_utf8_lossy(&self.bytes(40)).into_owned(),
            3 => "acme\u{0}\u{7f}\u{202e}".into(),
            4 => "<script>\"'&".into(),
            _ => format!("acct-{}", self.below(5)),
        }
    }
    fn amount(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => u64::MAX - self.below(3),
            2 => self.below(2_000_000_000),
            _ => self.below(10),
        }
    }
    fn timestamp(&mut self) -> Option<prost_types::Timestamp> {
        match self.below(4) {
            0 => None,
            1 => Some(prost_types::Timestamp {
                seconds: self.next() as i64,
                nanos: self.next() as i32,
            }),
            2 => Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() + self.below(7200) as i64 - 3600,
                nanos: 0,
            }),
            _ => Some(prost_types::Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            }),
        }
    }
    fn deduct(&mut self) -> proto::DeductRequest {
        proto::DeductRequest {
            account_id: self.string(),
            calls: self.amount(),
            egress_bytes: self.amount(),
            at: self.timestamp(),
            request_id: self.string(),
        }
    }
}

/// Each unary method, with whether a payload decodes as its request and
/// whether a reply decodes as its response.
struct Method {
    path: &'static str,
    request_decodes: fn(&[u8]) -> bool,
    response_decodes: fn(&[u8]) -> bool,
}

fn decodes<M: Message + Default>(bytes: &[u8]) -> bool {
    M::decode(bytes).is_ok()
}

macro_rules! method {
    ($path:literal, $req:ty, $resp:ty) => {
        Method {
            path: $path,
            request_decodes: decodes::<$req>,
            response_decodes: decodes::<$resp>,
        }
    };
}

const METHODS: &[Method] = &[
    method!(
        "/packmeter.v1.Meter/Deduct",
        proto::DeductRequest,
        proto::DeductResponse
    ),
    method!(
        "/packmeter.v1.Meter/DeductBatch",
        proto::DeductBatchRequest,
        proto::DeductBatchResponse
    ),
    method!(
        "/packmeter.v1.Meter/GetUsage",
        proto::GetUsageRequest,
        proto::GetUsageResponse
    ),
    method!(
        "/packmeter.v1.Admin/PutAccount",
        proto::PutAccountRequest,
        proto::Account
    ),
    method!(
        "/packmeter.v1.Admin/GetAccount",
        proto::GetAccountRequest,
        proto::Account
    ),
    method!(
        "/packmeter.v1.Admin/GrantPack",
        proto::GrantPackRequest,
        proto::Pack
    ),
    method!(
        "/packmeter.v1.Admin/ListPacks",
        proto::ListPacksRequest,
        proto::ListPacksResponse
    ),
];

/// Codes a bad request may get. INTERNAL or UNKNOWN would mean a bug.
fn acceptable(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::AlreadyExists
    )
}

#[tokio::test]
async fn random_bytes_and_hostile_fields_get_precise_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut meter = server.meter().await;
    let baseline = meter
        .deduct(deduct("steady", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&baseline.calls).0, 1);

    let mut rng = Rng(fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15));
    let mut raw = tonic::client::Grpc::new(server.channel().await);
    let (mut accepted, mut refused) = (0, 0);
    for round in 0..300 {
        let method = &METHODS[round % METHODS.len()];
        let body = if round % 3 == 0 {
            rng.deduct().encode_to_vec()
        } else {
            rng.bytes(64)
        };
        let valid = (method.request_decodes)(&body);
        raw.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(method.path);
        match raw
            .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(body.clone()), path, RawCodec)
            .await
        {
            Ok(reply) => {
                // Accepted: the payload really was a valid request, and the
                // reply is a valid response.
                accepted += 1;
                assert!(valid, "{}: accepted {body:02x?}", method.path);
                assert!(
                    (method.response_decodes)(reply.get_ref()),
                    "{}",
                    method.path
                );
            }
            Err(s) if !valid => {
                // Not a message at all: INVALID_ARGUMENT that says so.
                refused += 1;
                assert_eq!(s.code(), Code::InvalidArgument, "{}: {s:?}", method.path);
                assert!(!s.message().is_empty(), "{}", method.path);
            }
            Err(s) => assert!(acceptable(s.code()), "{}: {s:?}", method.path),
        }
    }
    // The generator reached both sides of the decoder.
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
    for _ in 0..300 {
        let req = rng.deduct();
        if let Err(s) = meter.deduct(req.clone()).await {
            assert!(acceptable(s.code()), "{req:?}: {s:?}");
            assert!(!s.message().is_empty());
        }
        let batch = proto::DeductBatchRequest {
            deductions: vec![rng.deduct(), rng.deduct()],
        };
        if let Err(s) = meter.deduct_batch(batch).await {
            assert!(acceptable(s.code()), "{s:?}");
            assert!(s.message().starts_with("deductions["), "{}", s.message());
        }
    }
    let mut admin = server.admin().await;
    for _ in 0..100 {
        let grant = proto::GrantPackRequest {
            account_id: rng.string(),
            item: rng.below(5) as i32 - 1,
            capacity: rng.amount(),
            valid_from: rng.timestamp(),
            valid_until: rng.timestamp(),
            pack_id: rng.string(),
            priority: rng.next() as u32,
            valid_for: None,
        };
        if let Err(s) = admin.grant_pack(grant.clone()).await {
            assert!(acceptable(s.code()), "{grant:?}: {s:?}");
        }
        let put = proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: rng.string(),
                activated_at: rng.timestamp(),
                suspended: false,
                deny_on_exhausted: false,
                billing_zone: String::new(),
            }),
            update_mask: None,
        };
        if let Err(s) = admin.put_account(put.clone()).await {
            assert!(acceptable(s.code()), "{put:?}: {s:?}");
        }
    }

    // Still serving, and the untouched account's counter is intact.
    let after = meter
        .deduct(deduct("steady", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&after.calls), (1, 0, 999_998));
    let packs = admin
        .list_packs(proto::ListPacksRequest {
            account_id: "steady".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .packs;
    assert_eq!(common::used(&packs, Item::Calls), 2);
    assert!(packs.iter().all(|p| p.used <= p.capacity));
    admin.flush(proto::FlushRequest {}).await.unwrap();
}
