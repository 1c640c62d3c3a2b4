//! What the real-process tests of every crate share: a daemon started and
//! awaited until it says "listening on ADDR", signalled and stopped by its
//! PID, and killed when the test drops it (also when it panics).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to start listening, or to stop on SIGTERM.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running daemon, killed (by its PID) when dropped.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
}

impl Daemon {
    /// Start `cmd` (stdout piped, stderr inherited, `RUST_LOG=warn`) and wait
    /// for the address it prints after "listening on ".
    ///
    /// # Panics
    /// If it cannot be started or does not listen within [`START_TIMEOUT`]
    /// (it is killed first).
    pub fn start(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the daemon");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1)
                    && let Ok(a) = addr.trim().parse::<SocketAddr>()
                {
                    let _ = tx.send(a);
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => Daemon { child, addr },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not start listening");
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: a signal to our own child, by its PID.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Power loss for the process: SIGKILL, and reap it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the daemon to exit on its own: its status, or `None` if it
    /// still runs after `timeout` (it is killed on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the daemon") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and the exit status.
    ///
    /// # Panics
    /// If it has not exited within [`STOP_TIMEOUT`] (it is killed on drop).
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the daemon") {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A stopped process cannot die of SIGKILL until it is continued.
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
