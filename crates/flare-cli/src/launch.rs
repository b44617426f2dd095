//! `flare train --gpus N`: the launcher of a data-parallel run on one host, as `torchrun`
//! launches PyTorch's. It starts N processes of this very executable with the same arguments,
//! each with the variables of [`flare::train::distributed`] set (`RANK` = `LOCAL_RANK` = k,
//! `WORLD_SIZE` = `LOCAL_WORLD_SIZE` = N, `FLARE_MASTER_ADDR`/`PORT` of a free local port),
//! so that each trains on `cuda:k` and joins the others through NCCL. The children's stderr
//! lines are printed prefixed with `[rank k]`; rank 0's stdout passes through (the other
//! ranks print nothing there). If a rank fails, the launcher stops the others and reports the
//! failing rank's exit status and its last stderr lines.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flare::train::distributed::{
    free_port, DEFAULT_MASTER_ADDR, ENV_LOCAL_RANK, ENV_LOCAL_WORLD_SIZE, ENV_MASTER_ADDR,
    ENV_MASTER_PORT, ENV_RANK, ENV_WORLD_SIZE,
};

/// How many of a failed rank's last stderr lines the launcher's error quotes.
const TAIL_LINES: usize = 20;

/// A started rank: its process, the thread that forwards its stderr, and the last lines.
struct Rank {
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// Runs `world_size` ranks of `exe args` on this host (see the module's doc) and waits for
/// them. `Ok` when every rank exits successfully; otherwise the first rank found failed is
/// named, with its status and last stderr lines, after the others are killed.
pub fn launch(exe: &Path, args: &[OsString], world_size: usize) -> Result<()> {
    let port = free_port()?;
    let mut ranks: Vec<Rank> = Vec::with_capacity(world_size);
    for rank in 0..world_size {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env(ENV_RANK, rank.to_string())
            .env(ENV_LOCAL_RANK, rank.to_string())
            .env(ENV_WORLD_SIZE, world_size.to_string())
            .env(ENV_LOCAL_WORLD_SIZE, world_size.to_string())
            .env(ENV_MASTER_ADDR, DEFAULT_MASTER_ADDR)
            .env(ENV_MASTER_PORT, port.to_string())
            .stdin(Stdio::null())
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut ranks);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let reader = child.stderr.take().map(|err| {
            let tail = tail.clone();
            std::thread::spawn(move || forward(rank, err, &tail))
        });
        ranks.push(Rank {
            child,
            reader,
            tail,
        });
    }
    // Poll every rank: the first failure stops the run (a rank blocked in a collective would
    // otherwise wait for the dead one forever).
    let mut done = vec![false; world_size];
    loop {
        for rank in 0..world_size {
            if done[rank] {
                continue;
            }
            let status = ranks[rank]
                .child
                .try_wait()
                .with_context(|| format!("waiting for rank {rank}"))?;
            match status {
                Some(s) if s.success() => done[rank] = true,
                Some(s) => {
                    stop(&mut ranks);
                    return Err(failure(rank, s, &ranks[rank]));
                }
                None => {}
            }
        }
        if done.iter().all(|&d| d) {
            for r in &mut ranks {
                if let Some(h) = r.reader.take() {
                    let _ = h.join();
                }
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Copies a rank's stderr to ours, each line prefixed with `[rank k]`, keeping the last
/// [`TAIL_LINES`] lines for the error report.
fn forward(rank: usize, err: impl std::io::Read, tail: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(err);
    let mut buf = Vec::new();
    // Bytes, not `lines()`: a line that is not UTF-8 must not stop the draining (a rank
    // writing into a full pipe would block).
    while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
        let line = String::from_utf8_lossy(&buf)
            .trim_end_matches(['\n', '\r'])
            .to_string();
        buf.clear();
        // A closed stderr of ours must not stop the rank: the line is dropped.
        let _ = writeln!(std::io::stderr(), "[rank {rank}] {line}");
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// Kills every rank still running, waits for all, and lets their stderr readers finish.
fn stop(ranks: &mut [Rank]) {
    for r in ranks.iter_mut() {
        if matches!(r.child.try_wait(), Ok(None)) {
            let _ = r.child.kill();
        }
    }
    for r in ranks.iter_mut() {
        let _ = r.child.wait();
        if let Some(h) = r.reader.take() {
            let _ = h.join();
        }
    }
}

/// The launcher's error for a rank that exited with `status`.
fn failure(rank: usize, status: ExitStatus, r: &Rank) -> anyhow::Error {
    let tail = r.tail.lock().unwrap_or_else(|p| p.into_inner());
    let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
    let quoted = if lines.is_empty() {
        " (it printed nothing on stderr)".to_string()
    } else {
        format!("; its last stderr lines:\n  {}", lines.join("\n  "))
    };
    anyhow::anyhow!(
        "rank {rank} of the data-parallel run failed ({status}); the other ranks were \
         stopped{quoted}"
    )
}

/// Checks what `--gpus N` (N > 1) needs before any rank is started: a build with the `nccl`
/// feature and a CUDA device (`--device` auto or cuda, not cpu nor one GPU named).
pub fn check_launch(gpus: usize, device: &str) -> Result<()> {
    let d = device.trim().to_ascii_lowercase();
    if d == "cpu" {
        bail!(
            "--gpus {gpus} with --device cpu: data-parallel training needs CUDA GPUs and the \
             nccl feature (one process per GPU); drop --gpus to train on the CPU"
        );
    }
    if !cfg!(feature = "nccl") {
        bail!(
            "--gpus {gpus}: data-parallel training needs CUDA and the nccl feature, and this \
             flare was built without it (cargo build --release --features nccl)"
        );
    }
    if d.starts_with("cuda:") {
        bail!(
            "--gpus {gpus} with --device {device}: each rank k trains on cuda:k; use --device \
             cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    #[test]
    fn every_rank_gets_its_variables_and_success_is_ok() {
        let script = r#"test "$WORLD_SIZE" = 3 && test "$LOCAL_WORLD_SIZE" = 3 \
            && test "$RANK" = "$LOCAL_RANK" && test "$RANK" -lt 3 \
            && test "$FLARE_MASTER_ADDR" = 127.0.0.1 && test "$FLARE_MASTER_PORT" -gt 0"#;
        launch(Path::new("/bin/sh"), &sh(script), 3).unwrap();
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_is_named_with_its_last_lines() {
        // Rank 1 fails; ranks 0 and 2 would run for ten minutes unless stopped.
        let script = r#"if [ "$RANK" = 1 ]; then
                echo "loading the model" >&2
                echo "error: cuda:1 is out of memory" >&2
                exit 3
            fi
            exec sleep 600"#;
        let e = launch(Path::new("/bin/sh"), &sh(script), 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 of the data-parallel run failed"), "{e}");
        assert!(e.contains("exit status: 3"), "{e}");
        assert!(
            e.contains("loading the model\n  error: cuda:1 is out of memory"),
            "{e}"
        );
        // A rank that prints nothing still gets a clear report.
        let e = launch(Path::new("/bin/sh"), &sh("exit 1"), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("it printed nothing on stderr"), "{e}");
    }

    #[test]
    fn the_launch_needs_cuda_and_nccl() {
        let e = check_launch(2, "cpu").unwrap_err().to_string();
        assert!(e.contains("--gpus 2 with --device cpu"), "{e}");
        let e = check_launch(4, "cuda").map_err(|e| e.to_string());
        if cfg!(feature = "nccl") {
            assert!(e.is_ok());
            let e = check_launch(4, "cuda:1").unwrap_err().to_string();
            assert!(e.contains("each rank k trains on cuda:k"), "{e}");
        } else {
            let e = e.unwrap_err();
            assert!(e.contains("built without it"), "{e}");
        }
    }
}
