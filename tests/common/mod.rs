//! Starts the real `packmeter` binary on 127.0.0.1:0 with a temporary SQLite
//! file (or any store URL), and connects the generated tonic clients to it.
//! [`pg`] gives a test a PostgreSQL database of its own.
#![allow(dead_code)]

#[cfg(feature = "postgres")]
pub mod fleet;
mod http;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod pki;
pub mod proxy;
#[allow(unused_imports)]
pub use http::{get, get_with, sample};

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use packmeter::grpc::proto::{self, admin_client::AdminClient, meter_client::MeterClient};
use prost_types::Timestamp;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_packmeter");

pub struct Server {
    child: Child,
    pub grpc: String,
    pub admin: String,
    pub db: PathBuf,
    /// Keeps stderr flowing so the server never blocks on a full pipe.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    /// Starts a server on a fresh SQLite file in `dir`.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::start_on(&dir.join("packmeter.db"), extra)
    }

    /// Starts a server on the given SQLite file (for restarts).
    pub fn start_on(db: &Path, extra: &[&str]) -> Server {
        Server::launch(&format!("sqlite://{}", db.display()), None, extra, db)
    }

    /// Starts a server on any store URL, with `data` as its data directory
    /// (`XDG_DATA_HOME`: where a PostgreSQL node keeps its spill file).
    pub fn start_store(store: &str, data: &Path, extra: &[&str]) -> Server {
        Server::launch(store, Some(data), extra, data)
    }

    /// As [`start_store`](Self::start_store), on the given gRPC and admin
    /// addresses (to restart a node where it was).
    pub fn start_store_at(
        store: &str,
        data: &Path,
        grpc: &str,
        admin: &str,
        extra: &[&str],
    ) -> Server {
        Server::launch_command(
            Command::new(BIN),
            (grpc, admin),
            store,
            Some(data),
            extra,
            data,
        )
    }

    /// As [`start_store`](Self::start_store), with `prepare` applied to
    /// the command first (environment).
    pub fn start_store_prepared(
        store: &str,
        data: &Path,
        extra: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Server {
        let mut command = Command::new(BIN);
        prepare(&mut command);
        Server::launch_command(
            command,
            ("127.0.0.1:0", "127.0.0.1:0"),
            store,
            Some(data),
            extra,
            data,
        )
    }

    /// Starts a server on the given SQLite file, with `prepare` applied to
    /// the command first (limits for the child, environment).
    pub fn start_prepared(db: &Path, extra: &[&str], prepare: impl FnOnce(&mut Command)) -> Server {
        let mut command = Command::new(BIN);
        prepare(&mut command);
        Server::launch_command(
            command,
            ("127.0.0.1:0", "127.0.0.1:0"),
            &format!("sqlite://{}", db.display()),
            None,
            extra,
            db,
        )
    }

    /// Starts a server on a fresh SQLite file in `dir`, listening on `host`
    /// (both ports, each on a free port) rather than 127.0.0.1.
    pub fn start_host(dir: &Path, host: &str, extra: &[&str]) -> Server {
        let db = dir.join("packmeter.db");
        let (grpc, admin) = (format!("{host}:0"), format!("{host}:0"));
        Server::launch_command(
            Command::new(BIN),
            (&grpc, &admin),
            &format!("sqlite://{}", db.display()),
            None,
            extra,
            &db,
        )
    }

    fn launch(store: &str, data: Option<&Path>, extra: &[&str], db: &Path) -> Server {
        Server::launch_command(
            Command::new(BIN),
            ("127.0.0.1:0", "127.0.0.1:0"),
            store,
            data,
            extra,
            db,
        )
    }

    /// Starts a server on the given SQLite file at the given addresses
    /// (see [`free_addr`]) and returns at once, before it is ready: the
    /// ports are bound early, and the returned stdout gives the listening
    /// line once start-up (the replay of the journal) is done. For watching
    /// start-up from outside.
    pub fn spawn_on_at(
        db: &Path,
        (grpc, admin): (&str, &str),
        extra: &[&str],
    ) -> (Server, BufReader<std::process::ChildStdout>) {
        let (child, stdout, stderr) = Server::spawn(
            Command::new(BIN),
            (grpc, admin),
            &format!("sqlite://{}", db.display()),
            None,
            extra,
        );
        let server = Server {
            child,
            grpc: grpc.to_string(),
            admin: admin.to_string(),
            db: db.to_path_buf(),
            stderr: Some(stderr),
        };
        (server, BufReader::new(stdout))
    }

    fn spawn(
        mut command: Command,
        (grpc, admin): (&str, &str),
        store: &str,
        data: Option<&Path>,
        extra: &[&str],
    ) -> (
        Child,
        std::process::ChildStdout,
        std::thread::JoinHandle<String>,
    ) {
        if let Some(data) = data {
            command.env("XDG_DATA_HOME", data);
        }
        let mut child = command
            .arg("serve")
            .args(["--listen", grpc, "--admin-listen", admin])
            .arg("--store")
            .arg(store)
            .args(extra)
            .env_remove("PACKMETER_CONFIG")
            .env_remove("PACKMETER_ADMIN_TOKEN_FILE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn packmeter");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        (child, stdout, stderr)
    }

    fn launch_command(
        command: Command,
        (grpc, admin): (&str, &str),
        store: &str,
        data: Option<&Path>,
        extra: &[&str],
        db: &Path,
    ) -> Server {
        let (mut child, stdout, stderr) = Server::spawn(command, (grpc, admin), store, data, extra);
        // The server prints one line once it is ready: its ports bound, and
        // the journal and the spill file replayed.
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let mut grpc = None;
        let mut admin = None;
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("grpc=") {
                grpc = Some(a.to_string());
            }
            if let Some(a) = part.strip_prefix("admin=") {
                admin = Some(a.to_string());
            }
        }
        let (Some(grpc), Some(admin)) = (grpc, admin) else {
            let _ = child.kill();
            let err = stderr.join().unwrap_or_default();
            panic!("server did not start: stdout {line:?}\nstderr:\n{err}");
        };
        Server {
            child,
            grpc,
            admin,
            db: db.to_path_buf(),
            stderr: Some(stderr),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to packmeter")
    }

    pub async fn meter(&self) -> MeterClient<Channel> {
        MeterClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// Every pack of `account`, through `Admin.ListPacks`.
    pub async fn packs(&self, account: &str) -> Vec<proto::Pack> {
        self.admin()
            .await
            .list_packs(proto::ListPacksRequest {
                account_id: account.into(),
            })
            .await
            .expect("ListPacks")
            .into_inner()
            .packs
    }

    /// `Admin.PutAccount` setting both flags, with the current (or a new)
    /// activation.
    pub async fn put_account(&self, account: &str, suspended: bool, deny: bool) -> proto::Account {
        self.admin()
            .await
            .put_account(proto::PutAccountRequest {
                account: Some(proto::Account {
                    account_id: account.into(),
                    activated_at: None,
                    suspended,
                    deny_on_exhausted: deny,
                    billing_zone: String::new(),
                }),
                // Both flags as given; the activation kept (or now).
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["suspended".into(), "deny_on_exhausted".into()],
                }),
            })
            .await
            .expect("PutAccount")
            .into_inner()
    }

    /// The value of an unlabelled series in `/metrics`.
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&get(&self.admin, "/metrics").await.body, series)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Sends SIGTERM and waits for the exit; returns the status and stderr.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal("-TERM");
        self.wait()
    }

    /// Sends SIGTERM without waiting.
    pub fn send_term(&self) {
        self.signal("-TERM");
    }

    /// The exit status if the process has exited; never blocks.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("check packmeter's status")
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> (ExitStatus, String) {
        let status = self.child.wait().expect("wait for packmeter");
        let err = self.stderr.take().map(|h| h.join().unwrap_or_default());
        (status, err.unwrap_or_default())
    }

    /// SIGKILL: no drain, no final flush.
    pub fn kill9(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An RFC 3339 instant as a protobuf timestamp.
pub fn ts(s: &str) -> Timestamp {
    let d = chrono::DateTime::parse_from_rfc3339(s).expect("valid RFC 3339");
    Timestamp {
        seconds: d.timestamp(),
        nanos: d.timestamp_subsec_nanos() as i32,
    }
}

/// Opens a `DeductStream`: a sender for its messages (room for `room`
/// unsent ones) and its replies.
pub async fn open_stream(
    meter: &mut MeterClient<Channel>,
    room: usize,
) -> (
    tokio::sync::mpsc::Sender<proto::DeductRequest>,
    tonic::Streaming<proto::DeductResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(room);
    let replies = meter
        .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    (tx, replies)
}

pub fn deduct(account: &str, calls: u64, egress: u64, at: Option<&str>) -> proto::DeductRequest {
    proto::DeductRequest {
        account_id: account.into(),
        calls,
        egress_bytes: egress,
        at: at.map(ts),
        request_id: String::new(),
    }
}

/// (covered, overage, remaining) of an outcome.
pub fn split(o: &Option<proto::Outcome>) -> (u64, u64, u64) {
    let o = o.unwrap_or_default();
    (o.covered, o.overage, o.remaining)
}

/// Total used of the packs of `item` in a listing.
pub fn used(packs: &[proto::Pack], item: proto::Item) -> u64 {
    packs
        .iter()
        .filter(|p| p.item == item as i32)
        .map(|p| p.used)
        .sum()
}

/// Whether tests that need an outside tool must run (CI) or may skip.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Finds a tool on PATH; outside CI a missing tool skips the test loudly.
pub fn tool(name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(!required(), "{name} is required under CI=true: {install}");
        eprintln!(
            "SKIPPED: {name} not found on PATH ({install}); set CI=true to make this a failure"
        );
    }
    found
}

/// A filesystem the test makes itself: a 4 MiB tmpfs where the machine
/// allows mounting one (root), unmounted on drop.
pub struct SmallFs {
    pub path: std::path::PathBuf,
}

impl SmallFs {
    pub fn mount(at: &Path) -> Option<SmallFs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "packmeter-test"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs {
            path: at.to_path_buf(),
        })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// Fills the filesystem of `dir` with a ballast file until it refuses more.
pub fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..512]).is_ok() {}
    let _ = f.sync_all();
    path
}

/// A free address on 127.0.0.1: bound and released at once, for a server
/// that must be reachable before it prints its listening line.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address").to_string()
}

/// Polls `f` until it returns true; panics after `limit`. For waiting on
/// an observable state, never as a stand-in for synchronization.
pub async fn until(limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends and receives raw bytes, to put malformed messages on the wire.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use tokio_util::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, Self::Error> {
        use tokio_util::bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// A small ext4 filesystem on a loop device, mounted with
/// `errors=remount-ro`, that the test can turn read-only while files on it
/// are open for writing ([`go_read_only`](Self::go_read_only)): what a
/// failing volume does. Root only; unmounted and detached on drop.
pub struct ReadOnlyFs {
    pub path: PathBuf,
    image: PathBuf,
    loop_dev: String,
    mounted: bool,
}

impl ReadOnlyFs {
    /// [`mount`](Self::mount), or, where the machine does not allow it,
    /// `None` after printing `SKIPPED` (a failure under `CI=true`).
    pub fn mount_or_skip(dir: &Path) -> Option<ReadOnlyFs> {
        match ReadOnlyFs::mount(dir) {
            Ok(fs) => Some(fs),
            Err(why) => {
                assert!(
                    !required(),
                    "a loop-device ext4 filesystem is required under CI=true (run as root): {why}"
                );
                eprintln!("SKIPPED: cannot mount an ext4 loop device here ({why}); set CI=true to make this a failure");
                None
            }
        }
    }

    /// Makes a 32 MiB image in `dir`, attaches it and mounts it at
    /// `dir/fs`; `Err` says why the machine does not allow it.
    pub fn mount(dir: &Path) -> Result<ReadOnlyFs, String> {
        let run = |cmd: &mut Command| -> Result<String, String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            } else {
                Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let image = dir.join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(32 << 20))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").arg("-q").arg(&image))?;
        let loop_dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&image))?;
        let mut fs = ReadOnlyFs {
            path: dir.join("fs"),
            image,
            loop_dev,
            mounted: false,
        };
        std::fs::create_dir_all(&fs.path).map_err(|e| e.to_string())?;
        fs.mount_rw()?;
        Ok(fs)
    }

    fn mount_rw(&mut self) -> Result<(), String> {
        let out = Command::new("mount")
            .args(["-o", "errors=remount-ro", &self.loop_dev])
            .arg(&self.path)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "mount {}: {}",
                self.loop_dev,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        self.mounted = true;
        Ok(())
    }

    /// Raises an ext4 error (`/sys/fs/ext4/loopN/trigger_fs_error`): the
    /// journal aborts and the kernel remounts the filesystem read-only;
    /// from then on every write through every open descriptor fails with
    /// EROFS, while reads still work.
    pub fn go_read_only(&self) {
        let name = self.loop_dev.trim_start_matches("/dev/");
        std::fs::write(
            format!("/sys/fs/ext4/{name}/trigger_fs_error"),
            "packmeter test: the store's volume fails",
        )
        .expect("trigger an ext4 error");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let line = mounts
            .lines()
            .find(|l| l.starts_with(&format!("{} ", self.loop_dev)))
            .expect("still mounted");
        // (Newer kernels list it as `rw,…,emergency_ro`.)
        let options = line.split_whitespace().nth(3).unwrap();
        assert!(
            options.split(',').any(|o| o == "ro" || o == "emergency_ro"),
            "remounted read-only: {line}"
        );
    }

    /// The operator's recovery: unmount, `e2fsck -fy`, mount read-write
    /// again. Nothing may have the filesystem open.
    pub fn repair(&mut self) {
        let ok = Command::new("umount").arg(&self.path).status().unwrap();
        assert!(ok.success(), "umount {}", self.path.display());
        self.mounted = false;
        let fsck = Command::new("e2fsck")
            .args(["-fy", &self.loop_dev])
            .output()
            .unwrap();
        // 0: clean, 1: errors corrected.
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        self.mount_rw().expect("mount the repaired filesystem");
    }
}

impl Drop for ReadOnlyFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.path).status();
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}
