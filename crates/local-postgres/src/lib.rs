//! A private PostgreSQL cluster started from the server binaries installed on this machine.
//!
//! The engine uses it as its embedded default database when no database is configured, and the
//! test harness uses it when `DATABASE_URL` is unset: one mechanism for both.
//!
//! * The server listens only on a Unix socket inside its own data directory (mode 0700, trust
//!   authentication), so nothing else on the machine can reach it.
//! * PostgreSQL refuses to run as root. When this process is root, the cluster belongs to an
//!   unprivileged user (`postgres` when the distribution created it, otherwise `engine-pg`,
//!   created on demand) and every server command runs as that user.
//! * Any number of processes may use one data directory: the first starts the server, the others
//!   join it, and the last to leave stops it. Each process has a watchdog, a child that holds a
//!   shared lock (`flock`) on `<data dir>.users.lock` (beside the data directory, which initdb
//!   wants empty) for it and the read end of
//!   a pipe whose write end only this process holds. When this process exits for any reason,
//!   SIGKILL included, the pipe closes; the watchdog then drops its shared lock and, if no other
//!   process holds one, stops the server (and, for an ephemeral cluster, removes its directory).
//!   Starting, joining and leaving are serialised by `<data dir>.start.lock`.

mod binaries;
mod owner;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use nix::fcntl::{Flock, FlockArg};

pub use binaries::find_bin_dir;
pub use owner::Owner;

/// The role and database a new cluster is created with.
pub const SUPERUSER: &str = "engine";
/// The database created in a new cluster.
pub const DATABASE: &str = "engine";
const PORT: u16 = 5432;
/// The replication slot a standby made by [`Options::standby`] streams from.
pub const STANDBY_SLOT: &str = "engine_standby";
/// Unix socket paths are limited to 107 bytes; the socket file name adds 15.
const MAX_SOCKET_DIR_LEN: usize = 90;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no PostgreSQL server binaries found (looked for initdb and pg_ctl on PATH and in \
         /usr/lib/postgresql/*/bin); install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`, \
         Fedora: `dnf install postgresql-server`) or point the engine at an existing server with \
         DATABASE_URL or database.url"
    )]
    NoBinaries,
    #[error("cannot prepare an unprivileged user for PostgreSQL: {0}")]
    Owner(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error(
        "the PostgreSQL directory {path} is not usable by user {user}: every parent directory must be \
         searchable by that user; choose a data directory under /var/lib or /tmp"
    )]
    Unreachable { path: PathBuf, user: String },
    #[error("the PostgreSQL directory path {0} is too long for a Unix socket (at most {MAX_SOCKET_DIR_LEN} bytes)")]
    PathTooLong(PathBuf),
}

/// How to set up the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster's data directory; created (with its parents) when missing.
    pub data_dir: PathBuf,
    /// Throw-away cluster: the directory is removed when the server stops, and unless `durable`
    /// is set, fsync and full-page writes are off (fast tests, no crash safety).
    pub ephemeral: bool,
    /// Keep PostgreSQL's crash-safety settings even for an ephemeral cluster (benchmarks).
    pub durable: bool,
    /// Extra `postgresql.conf` settings, such as `("shared_buffers", "1GB")`.
    pub settings: Vec<(String, String)>,
    /// Environment variables for the server's processes (a test's `LD_PRELOAD` of libfaketime).
    pub env: Vec<(String, String)>,
    /// Make a fresh cluster as a streaming standby of this primary's data directory (a running
    /// local cluster): `pg_basebackup -R` instead of initdb. It replays the primary's WAL, read-only.
    pub standby_of: Option<PathBuf>,
}

impl Options {
    /// A persistent cluster with PostgreSQL's defaults.
    pub fn persistent(data_dir: PathBuf) -> Self {
        Options {
            data_dir,
            ephemeral: false,
            durable: true,
            settings: Vec::new(),
            env: Vec::new(),
            standby_of: None,
        }
    }

    /// A throw-away cluster for tests.
    pub fn throwaway(data_dir: PathBuf) -> Self {
        Options {
            data_dir,
            ephemeral: true,
            durable: false,
            settings: Vec::new(),
            env: Vec::new(),
            standby_of: None,
        }
    }

    /// A throw-away streaming standby of the running local cluster at `primary` (tests).
    pub fn standby(data_dir: PathBuf, primary: &Path) -> Self {
        Options {
            standby_of: Some(primary.to_path_buf()),
            ..Options::throwaway(data_dir)
        }
    }
}

/// A running cluster this process uses. Left by [`LocalPostgres::stop`], on drop, or by the
/// watchdog when this process dies; the server stops when its last user leaves.
pub struct LocalPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    owner: Owner,
    watchdog: Option<Watchdog>,
}

/// What leaving the cluster did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// This process was the last to use it: the server was stopped.
    Stopped,
    /// Other processes still use it: the server keeps running for them.
    StillInUse,
}

/// Serialises starting, joining and leaving the cluster: `<data dir>.start.lock`.
const START_LOCK: &str = "start.lock";
/// Held shared by every user's watchdog while its process lives: `<data dir>.users.lock`.
const USERS_LOCK: &str = "users.lock";

impl LocalPostgres {
    /// Initialises the cluster when needed and starts it. Blocking: call it before entering
    /// latency-sensitive code, or from `spawn_blocking`.
    pub fn start(options: Options) -> Result<Self, Error> {
        let bin_dir = find_bin_dir().ok_or(Error::NoBinaries)?;
        let owner = Owner::for_this_process().map_err(Error::Owner)?;
        let data_dir = absolute(&options.data_dir)?;
        if data_dir.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            return Err(Error::PathTooLong(data_dir));
        }
        prepare_dir(&data_dir, &owner)?;

        let mut pg = LocalPostgres {
            bin_dir,
            data_dir,
            owner,
            watchdog: None,
        };
        let _starting = pg.lock(START_LOCK, FlockArg::LockExclusive)?;
        let fresh = !pg.data_dir.join("PG_VERSION").exists();
        match (&options.standby_of, fresh) {
            (Some(primary), true) => pg.base_backup(primary)?,
            (None, true) => pg.initdb(options.ephemeral)?,
            _ => {}
        }
        let alone = pg.lock(USERS_LOCK, FlockArg::LockExclusiveNonblock).is_ok();
        if alone {
            pg.stop_leftover_server();
        }
        // The watchdog first: from here on, whatever happens to this process, it leaves.
        pg.watchdog = Some(pg.spawn_watchdog(options.ephemeral)?);
        if pg.server_running() {
            tracing::info!(data_dir = %pg.data_dir.display(), "joined the local PostgreSQL another process started");
            return Ok(pg);
        }
        pg.write_settings(&options)?;
        let mut start = pg.pg_ctl(["start", "-w", "-t", "120", "-l"]);
        start
            .arg(pg.data_dir.join("server.log"))
            .envs(options.env.iter().map(|(k, v)| (k, v)));
        pg.run(&mut start)?;
        if fresh && options.standby_of.is_none() {
            pg.run(pg.command("createdb").args(["-h"]).arg(&pg.data_dir).args([
                "-p",
                &PORT.to_string(),
                "-U",
                SUPERUSER,
                DATABASE,
            ]))?;
        }
        tracing::info!(data_dir = %pg.data_dir.display(), user = %pg.owner.name, "started local PostgreSQL");
        Ok(pg)
    }

    /// A connection URL for `database` on this cluster (over its Unix socket).
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost:{PORT}/{database}?host={}",
            self.data_dir.display()
        )
    }

    /// A connection URL for the cluster's own database.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Leaves the cluster: the server stops (fast shutdown: open sessions are ended, committed
    /// work is kept) unless other processes still use it.
    pub fn stop(mut self) -> Result<Left, Error> {
        self.leave()
    }

    fn leave(&mut self) -> Result<Left, Error> {
        let Some(mut watchdog) = self.watchdog.take() else {
            return Ok(Left::StillInUse);
        };
        drop(watchdog.pipe); // the watchdog now leaves for this process
        let mut said = String::new();
        let _ = watchdog.said.read_line(&mut said);
        let _ = watchdog.child.wait();
        match said.trim() {
            "stopped" => Ok(Left::Stopped),
            "in use" => Ok(Left::StillInUse),
            other => Err(Error::Command {
                command: "the watchdog's stop".into(),
                status: "unexpected answer".into(),
                output: format!(
                    "{other:?}; see {}",
                    self.data_dir.join("server.log").display()
                ),
            }),
        }
    }

    /// `<data dir>.<name>`, beside the data directory.
    fn lock_path(&self, name: &str) -> PathBuf {
        let mut path = self.data_dir.clone().into_os_string();
        path.push(format!(".{name}"));
        PathBuf::from(path)
    }

    /// Opens (creating it, for the owner) a lock file beside the data directory and locks it.
    fn lock(&self, name: &str, how: FlockArg) -> Result<Flock<fs::File>, Error> {
        let path = self.lock_path(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| Error::Io {
                action: "open",
                path: path.clone(),
                source,
            })?;
        self.owner.chown(&path).map_err(Error::Owner)?;
        Flock::lock(file, how).map_err(|(_, errno)| Error::Io {
            action: "lock",
            path,
            source: errno.into(),
        })
    }

    fn server_running(&self) -> bool {
        self.pg_ctl(["status"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn initdb(&self, ephemeral: bool) -> Result<(), Error> {
        let mut initdb = self.command("initdb");
        initdb.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        if ephemeral {
            initdb.arg("--no-sync");
        }
        self.run(&mut initdb)?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|source| Error::Io {
                action: "open",
                path: conf.clone(),
                source,
            })?;
        writeln!(file, "\ninclude_if_exists = 'engine.conf'").map_err(|source| Error::Io {
            action: "write",
            path: conf,
            source,
        })
    }

    /// A copy of the running cluster at `primary` that follows it: `standby.signal` and
    /// `primary_conninfo` (over the primary's Unix socket) written by `pg_basebackup -R`.
    fn base_backup(&self, primary: &Path) -> Result<(), Error> {
        let mut backup = self.command("pg_basebackup");
        backup
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-h")
            .arg(primary)
            .args([
                "-p",
                &PORT.to_string(),
                "-U",
                SUPERUSER,
                "-X",
                "stream",
                "-R",
                "--checkpoint=fast",
                "--no-sync",
            ])
            // A slot of its own: the primary keeps the WAL it has not received, however far behind.
            .args(["--create-slot", "--slot", STANDBY_SLOT]);
        // The primary's postgresql.conf comes along (with its include of engine.conf, which this
        // cluster rewrites for itself at start), and so does the lock file of its socket, which
        // lives in its data directory: this cluster's server would take it for another's.
        self.run(&mut backup)?;
        let lock = self.data_dir.join(format!(".s.PGSQL.{PORT}.lock"));
        match fs::remove_file(&lock) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                action: "remove",
                path: lock,
                source,
            }),
            _ => Ok(()),
        }
    }

    /// Settings rewritten at every start, so a moved directory keeps working.
    fn write_settings(&self, options: &Options) -> Result<(), Error> {
        let mut settings = format!(
            "# Written by the engine at every start; edit postgresql.conf instead.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{}'\n\
             unix_socket_permissions = 0700\n\
             port = {PORT}\n",
            self.data_dir.display().to_string().replace('\'', "''")
        );
        if options.ephemeral && !options.durable {
            settings.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        for (key, value) in &options.settings {
            settings.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        let path = self.data_dir.join("engine.conf");
        fs::write(&path, settings).map_err(|source| Error::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        self.owner.chown(&path).map_err(Error::Owner)
    }

    /// A server nobody uses (its last user and that user's watchdog were both killed): stopped,
    /// so that it restarts with this process's settings.
    fn stop_leftover_server(&self) {
        if self.data_dir.join("postmaster.pid").exists() {
            let stopped = self.run(&mut self.pg_ctl(["stop", "-m", "fast", "-w", "-t", "60"]));
            if stopped.is_ok() {
                tracing::warn!(data_dir = %self.data_dir.display(), "stopped a PostgreSQL server left running with no process using it");
            }
        }
    }

    /// Starts this process's watchdog and waits until it holds its shared lock on the users' lock
    /// file. When the pipe closes, it takes the start lock, drops its shared lock, and stops the
    /// server if no other watchdog holds one; it says `stopped` or `in use`.
    fn spawn_watchdog(&self, ephemeral: bool) -> Result<Watchdog, Error> {
        let stop = if ephemeral {
            r#""$0" -D "$1" stop -m immediate -w >/dev/null 2>&1 ; rm -rf "$1" "$2" "$3""#
        } else {
            r#""$0" -D "$1" stop -m fast -w -t 60 >/dev/null 2>&1"#
        };
        let script = format!(
            r#"exec 8>>"$2" 9>>"$3" || exit 1
flock -s 9 || exit 1
echo ready
read _
flock -x 8
flock -u 9
if flock -n -x 9; then {stop} ; echo stopped ; else echo "in use" ; fi"#
        );
        let mut sh = Command::new("/bin/sh");
        sh.arg("-c")
            .arg(script)
            .arg(self.bin_dir.join("pg_ctl"))
            .arg(&self.data_dir);
        sh.arg(self.lock_path(START_LOCK))
            .arg(self.lock_path(USERS_LOCK));
        sh.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        sh.process_group(0);
        self.owner.apply(&mut sh);
        let spawn_error = |source| Error::Io {
            action: "spawn watchdog for",
            path: self.data_dir.clone(),
            source,
        };
        let mut child = sh.spawn().map_err(spawn_error)?;
        let pipe = child.stdin.take().expect("stdin is piped");
        let mut said = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut ready = String::new();
        said.read_line(&mut ready).map_err(spawn_error)?;
        if ready.trim() != "ready" {
            let _ = child.wait();
            return Err(Error::Command {
                command: "the watchdog (/bin/sh and util-linux's flock)".into(),
                status: "did not start".into(),
                output: format!(
                    "could not lock {}; is `flock` installed?",
                    self.lock_path(USERS_LOCK).display()
                ),
            });
        }
        Ok(Watchdog { child, pipe, said })
    }

    fn pg_ctl<const N: usize>(&self, args: [&str; N]) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args(args);
        cmd
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.stdin(Stdio::null());
        // Keep terminal signals (Ctrl-C to the foreground group) away from the server: its life
        // is managed by `stop` and the watchdog.
        cmd.process_group(0);
        self.owner.apply(&mut cmd);
        cmd
    }

    fn run(&self, cmd: &mut Command) -> Result<Output, Error> {
        let described = format!("{cmd:?}");
        let output = cmd.output().map_err(|source| Error::Io {
            action: "run",
            path: PathBuf::from(cmd.get_program()),
            source,
        })?;
        if output.status.success() {
            return Ok(output);
        }
        let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if text.is_empty() {
            text = String::from_utf8_lossy(&output.stdout).trim().to_string();
        }
        let log = self.data_dir.join("server.log");
        if let Ok(log_text) = fs::read_to_string(&log) {
            let tail: Vec<&str> = log_text.lines().rev().take(5).collect();
            if !tail.is_empty() {
                text.push_str(&format!(
                    "\nlast lines of {}:\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        Err(Error::Command {
            command: described,
            status: output.status.to_string(),
            output: text,
        })
    }
}

/// This process's watchdog: it leaves the cluster for this process when `pipe` closes.
struct Watchdog {
    child: Child,
    pipe: ChildStdin,
    said: BufReader<ChildStdout>,
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if let Err(error) = self.leave() {
            tracing::warn!(%error, "stopping local PostgreSQL");
        }
    }
}

fn absolute(path: &Path) -> Result<PathBuf, Error> {
    std::path::absolute(path).map_err(|source| Error::Io {
        action: "resolve",
        path: path.to_path_buf(),
        source,
    })
}

/// Creates the directory, hands it to the owner with mode 0700 and checks the owner can reach it.
fn prepare_dir(dir: &Path, owner: &Owner) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    owner.chown(dir).map_err(Error::Owner)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| Error::Io {
        action: "set permissions on",
        path: dir.to_path_buf(),
        source,
    })?;
    if !owner.is_current() {
        let mut probe = Command::new("/bin/sh");
        probe
            .arg("-c")
            .arg(r#"test -w "$0" && test -x "$0""#)
            .arg(dir);
        owner.apply(&mut probe);
        let reachable = probe
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success());
        if !matches!(reachable, Ok(true)) {
            return Err(Error::Unreachable {
                path: dir.to_path_buf(),
                user: owner.name.clone(),
            });
        }
    }
    Ok(())
}
