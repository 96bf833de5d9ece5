//! A running `bpfnat monitor` for the tests that watch the datapath's events.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::Lab;

/// A running `bpfnat -o json monitor …`: its events, one JSON object per line. Stopped with
/// SIGINT (as Ctrl-C would) when dropped.
pub struct Monitor {
    child: Child,
    /// Every line it printed, parsed (events and lost-event reports).
    pub lines: Receiver<Value>,
}

impl Monitor {
    /// `bpfnat -o json monitor ARGS` in `lab`'s node.
    #[must_use]
    pub fn start(lab: &Lab, args: &[&str]) -> Self {
        let mut a = vec!["-o", "json", "monitor"];
        a.extend_from_slice(args);
        Self::spawn(lab.bpfnat(&a).expect("the monitor's command"))
    }

    /// `cmd`, a `bpfnat -o json monitor …` ready to run (in a cluster lab's node, say).
    #[must_use]
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bpfnat monitor");
        // Ready once it says so on stderr: the programs emit from then on.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        err.read_line(&mut first).unwrap();
        assert!(
            first.starts_with("bpfnat monitor:"),
            "monitor said: {first}"
        );
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&l).expect("one JSON object per line");
                assert_eq!(v["apiVersion"], "bpfnat/v1", "{l}");
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// Every event that arrives within `window`.
    #[must_use]
    pub fn events(&self, window: Duration) -> Vec<Value> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["kind"] == "MonitorEvent" => out.push(v),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return out,
            }
        }
    }

    /// Ctrl-C, and its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait().unwrap()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}
