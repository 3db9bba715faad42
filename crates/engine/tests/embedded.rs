//! Engine processes sharing the embedded database of one data directory: `engine serve`, CLI
//! commands beside it (two at once), and a SIGKILL. Serve stays ready throughout, every command
//! succeeds, and no server is left once every process is gone.

mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn serve(data_dir: &Path, port: u16) -> Child {
    engine()
        .env("ENGINE__DATA_DIR", data_dir)
        .env("ENGINE__HTTP__ADDR", format!("127.0.0.1:{port}"))
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A CLI command on the embedded database, started now.
fn command(data_dir: &Path, args: &[&str]) -> Child {
    engine()
        .env("ENGINE__DATA_DIR", data_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn succeeded(child: Child, args: &[&str]) -> String {
    let output = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "engine {args:?} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains("left running by"),
        "engine {args:?} took the server away:\n{stderr}"
    );
    stderr
}

/// The processes using the cluster: the holders of the shared lock on `<cluster>.users.lock`
/// (each process's watchdog holds one for it), as /proc/locks lists them.
fn users(data_dir: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(lock) = std::fs::metadata(data_dir.join("postgres.users.lock")) else {
        return 0;
    };
    let inode = format!(":{}", lock.ino());
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            line.contains("FLOCK") && line.split_whitespace().any(|field| field.ends_with(&inode))
        })
        .count()
}

/// The server's process id, from its `postmaster.pid`.
fn postmaster(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join("postgres/postmaster.pid"))
        .ok()
        .and_then(|pid| pid.lines().next().map(str::to_string))
}

fn server_running(data_dir: &Path) -> bool {
    data_dir.join("postgres/postmaster.pid").exists()
}

/// Polls `/readyz` every 20 ms until stopped, and keeps every answer that was not 200.
struct ReadyWatch {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    polls: Arc<Mutex<u32>>,
    thread: std::thread::JoinHandle<()>,
}

impl ReadyWatch {
    fn start(port: u16) -> ReadyWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(Mutex::new(0));
        let (flag, seen, count) = (stop.clone(), failures.clone(), polls.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match http(port, "GET", "/readyz", &[], None) {
                    Some((200, _)) => {}
                    other => seen.lock().unwrap().push(format!("{other:?}")),
                }
                *count.lock().unwrap() += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ReadyWatch {
            stop,
            failures,
            polls,
            thread,
        }
    }

    /// The answers that were not 200, and how many polls there were.
    fn finish(self) -> (Vec<String>, u32) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let failures = self.failures.lock().unwrap().clone();
        let polls = *self.polls.lock().unwrap();
        (failures, polls)
    }
}

#[test]
fn engines_share_one_embedded_server_and_the_last_to_leave_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    // Reachable by the unprivileged user the cluster runs as when the tests run as root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data_dir = dir.path();
    let port = free_port();
    let mut served = serve(data_dir, port);
    wait_until("/readyz", Duration::from_secs(60), || {
        http(port, "GET", "/readyz", &[], None).is_some_and(|(s, _)| s == 200)
    });

    // Six commands, two at a time, while serve runs.
    let watch = ReadyWatch::start(port);
    let pairs: [[&[&str]; 2]; 3] = [
        [&["retention", "status"], &["retention", "run"]],
        [&["migrate"], &["retention", "run", "--dry-run"]],
        [
            &["retention", "status"],
            &["retention", "run", "--task", "sessions"],
        ],
    ];
    for pair in pairs {
        let children: Vec<Child> = pair.iter().map(|args| command(data_dir, args)).collect();
        for (child, args) in children.into_iter().zip(pair) {
            succeeded(child, args);
        }
    }
    let (failures, polls) = watch.finish();
    assert!(polls > 10, "/readyz was polled {polls} times");
    assert!(
        failures.is_empty(),
        "/readyz failed {} of {polls} times while the commands ran: {failures:?}",
        failures.len()
    );
    assert!(server_running(data_dir), "serve still uses the server");

    // Serve is SIGKILLed once two commands have joined its server: they finish on it, the
    // server it started, not one of their own.
    let server = postmaster(data_dir).expect("serve's server is running");
    let both = [
        &["retention", "run"][..],
        &["retention", "run", "--dry-run"][..],
    ];
    let mut children: Vec<Child> = both.iter().map(|args| command(data_dir, args)).collect();
    // (A command that is done already has used the server and left it.)
    wait_until(
        "both commands to join the server",
        Duration::from_secs(60),
        || {
            users(data_dir) >= 3
                || children
                    .iter_mut()
                    .any(|child| child.try_wait().unwrap().is_some())
        },
    );
    served.kill().unwrap();
    served.wait().unwrap();
    for (child, args) in children.into_iter().zip(both) {
        let stderr = succeeded(child, args);
        assert!(
            stderr.contains("joined the local PostgreSQL"),
            "engine {args:?} did not run on serve's server:\n{stderr}"
        );
        assert!(
            !stderr.contains("started local PostgreSQL"),
            "engine {args:?} started a server of its own:\n{stderr}"
        );
    }
    assert_eq!(
        postmaster(data_dir).unwrap_or_else(|| server.clone()),
        server,
        "the server was restarted"
    );

    // Every process is gone: the last one's watchdog stopped the server.
    wait_until("the server to stop", Duration::from_secs(30), || {
        !server_running(data_dir)
    });

    // A serve killed alone leaves no server either.
    let port = free_port();
    let mut served = serve(data_dir, port);
    wait_until("/readyz", Duration::from_secs(60), || {
        http(port, "GET", "/readyz", &[], None).is_some_and(|(s, _)| s == 200)
    });
    assert!(server_running(data_dir));
    served.kill().unwrap();
    served.wait().unwrap();
    wait_until(
        "the server to stop after serve was killed",
        Duration::from_secs(30),
        || !server_running(data_dir),
    );
}
