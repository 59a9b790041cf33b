//! Progress of long commands (scrub, key rotation, large `coffer cat`): a bar on a terminal,
//! a plain line every ten seconds otherwise (logs, pipes, cron mail).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    what: &'static str,
    unit: &'static str,
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
    every: Duration,
}

impl Progress {
    /// `what` names the operation in plain lines; `unit` is "keys", "objects" or "bytes".
    pub fn new(what: &'static str, unit: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            let template = if unit == "bytes" {
                "{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)".to_string()
            } else {
                format!("{{bar:40}} {{pos}}/{{len}} {unit} ({{eta}} left)")
            };
            b.set_style(
                indicatif::ProgressStyle::with_template(&template).expect("valid template"),
            );
            b
        });
        Progress {
            what,
            unit,
            bar,
            last_line: Instant::now(),
            every: Duration::from_secs(10),
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            None => {
                if self.last_line.elapsed() >= self.every {
                    eprintln!("{}: {done}/{total} {}", self.what, self.unit);
                    self.last_line = Instant::now();
                }
            }
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
