//! Data-parallel training: one process per GPU (as `torchrun` runs PyTorch's DDP), each with a
//! full copy of the frozen base and of the adapters, a disjoint share of every step's
//! micro-batches, and the LoRA gradients summed over NCCL before clipping and AdamW, so that
//! every rank takes the same update and keeps identical adapters.
//!
//! The pieces, in the order a run uses them:
//!
//! - [`World`]: this process's place, read from the environment as `torchrun` names it
//!   (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); nothing set is a world of one.
//! - [`Rendezvous`]: rank 0 listens on `FLARE_MASTER_ADDR:FLARE_MASTER_PORT` (plain TCP), the
//!   other ranks connect and say who they are, and rank 0 hands each of them an opaque blob:
//!   the NCCL unique id every rank needs to build its communicator.
//! - [`shard_range`]: which of a step's micro-batches a rank runs.
//! - [`Collective`]: the sum of the ranks' gradients, one NCCL all-reduce of one flat f32
//!   buffer per step (a single bucket). A world of one does nothing.
//!
//! The same code serves one host and several: `flare train --gpus N` spawns N processes with
//! the variables set, and on several hosts the user starts one process per GPU with them.
//!
//! Why a sum, not a mean: the trainer divides each micro-batch's summed NLL by the token count
//! of the whole global step (every rank can count it: the data order is a function of the
//! seed), so each rank's gradient is its share of the global mean's gradient, and the shares
//! add up to it. Averaging them would divide the gradient by the world size a second time.
//!
//! There is no collective of flare's own: on the CPU, or in a build without the `nccl`
//! feature, a world of more than one rank is an error ([`Collective::connect`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};

use crate::{Error, Result};

/// The environment variable of this process's rank (0-based, over every host).
pub const ENV_RANK: &str = "RANK";
/// The environment variable of the number of processes (ranks) of the run, over every host.
pub const ENV_WORLD_SIZE: &str = "WORLD_SIZE";
/// The environment variable of this process's rank on its host: its CUDA device ordinal.
pub const ENV_LOCAL_RANK: &str = "LOCAL_RANK";
/// The environment variable of the number of ranks on this host (set by `flare train --gpus`).
pub const ENV_LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
/// The environment variable of rank 0's address (host name or IP), which every rank reaches.
pub const ENV_MASTER_ADDR: &str = "FLARE_MASTER_ADDR";
/// The environment variable of the TCP port rank 0 listens on for the rendezvous.
pub const ENV_MASTER_PORT: &str = "FLARE_MASTER_PORT";
/// Rank 0's address when [`ENV_MASTER_ADDR`] is not set (one host).
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// How long the rendezvous waits for every rank, by default.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn dist_err(msg: impl Into<String>) -> Error {
    Error::Distributed { msg: msg.into() }
}

// ---- the world ------------------------------------------------------------------------------

/// This process's place in a data-parallel run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    /// This process's rank, `0..world_size`, over every host.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// The rank on this host: the CUDA device ordinal the process trains on.
    pub local_rank: usize,
}

impl Default for World {
    fn default() -> Self {
        World::SINGLE
    }
}

impl World {
    /// A world of one: an ordinary run.
    pub const SINGLE: World = World {
        rank: 0,
        world_size: 1,
        local_rank: 0,
    };

    /// The world of this process's environment ([`Self::from_vars`] of `std::env::var`).
    pub fn from_env() -> Result<World> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The world that the variables `get` returns describe: none of `RANK` and `WORLD_SIZE`
    /// set is [`World::SINGLE`]; otherwise `RANK`, `WORLD_SIZE` and `LOCAL_RANK` must all be
    /// set, to integers with `RANK < WORLD_SIZE`. Errors name the variable and its value.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<World> {
        let (rank, size) = (get(ENV_RANK), get(ENV_WORLD_SIZE));
        if rank.is_none() && size.is_none() {
            return Ok(World::SINGLE);
        }
        let num = |name: &str, v: Option<String>| -> Result<usize> {
            let v = v.ok_or_else(|| {
                dist_err(format!(
                    "{name} is not set, but {} is: a rank of a data-parallel run needs \
                     {ENV_RANK}, {ENV_WORLD_SIZE} and {ENV_LOCAL_RANK}",
                    if name == ENV_RANK {
                        ENV_WORLD_SIZE
                    } else {
                        ENV_RANK
                    }
                ))
            })?;
            v.trim()
                .parse()
                .map_err(|_| dist_err(format!("{name}={v:?} is not a non-negative integer")))
        };
        let rank = num(ENV_RANK, rank)?;
        let world_size = num(ENV_WORLD_SIZE, size)?;
        if world_size == 0 {
            return Err(dist_err(format!(
                "{ENV_WORLD_SIZE}=0: a run has at least one rank"
            )));
        }
        if rank >= world_size {
            return Err(dist_err(format!(
                "{ENV_RANK}={rank} is not below {ENV_WORLD_SIZE}={world_size} (ranks are 0 to \
                 {})",
                world_size - 1
            )));
        }
        let local_rank = match get(ENV_LOCAL_RANK) {
            None => {
                return Err(dist_err(format!(
                    "{ENV_LOCAL_RANK} is not set, but {ENV_RANK} and {ENV_WORLD_SIZE} are: it \
                     names the GPU of this rank on its host"
                )))
            }
            v => num(ENV_LOCAL_RANK, v)?,
        };
        if local_rank > rank {
            return Err(dist_err(format!(
                "{ENV_LOCAL_RANK}={local_rank} is above {ENV_RANK}={rank}: a host's ranks are \
                 numbered from 0 on it"
            )));
        }
        Ok(World {
            rank,
            world_size,
            local_rank,
        })
    }

    /// Whether this is a world of one (no collective needed).
    pub fn is_single(&self) -> bool {
        self.world_size == 1
    }

    /// Whether this process is rank 0, the one that writes checkpoints, metrics and the
    /// adapter and reports progress.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

// ---- sharding -------------------------------------------------------------------------------

/// The share of rank `rank` (of `world_size`) of a list of `len` items (a step's
/// micro-batches): the contiguous block `len·rank/world_size .. len·(rank+1)/world_size`.
///
/// The blocks of ranks `0..world_size`, one after another, are exactly `0..len`: disjoint,
/// covering everything, in the original order; their sizes differ by at most one. A rank's
/// block is empty when `len < world_size`.
///
/// ```
/// use flare::train::distributed::shard_range;
/// assert_eq!(shard_range(5, 0, 2), 0..2);
/// assert_eq!(shard_range(5, 1, 2), 2..5);
/// ```
pub fn shard_range(len: usize, rank: usize, world_size: usize) -> Range<usize> {
    let n = world_size.max(1);
    let r = rank.min(n);
    // u128: no overflow of `len * rank` on any platform.
    let at = |r: usize| (len as u128 * r as u128 / n as u128) as usize;
    at(r)..at((r + 1).min(n))
}

// ---- rendezvous -----------------------------------------------------------------------------

/// The first bytes of every message of the rendezvous (its protocol and version).
const MAGIC: &[u8; 8] = b"flareRV1";
/// The largest blob the rendezvous hands out (the NCCL unique id is 128 bytes).
const MAX_BLOB: usize = 1 << 16;

/// The rendezvous of a data-parallel run: how the ranks find rank 0 and receive from it the
/// blob (the NCCL unique id) that makes them one communicator.
///
/// Protocol (TCP, every integer little-endian): a rank `r > 0` connects to rank 0 and sends
/// `MAGIC, r: u32, world_size: u32`; once every rank `1..world_size` has done so, rank 0
/// answers each `MAGIC, 0u8, len: u32, blob` (or `MAGIC, 1u8, len, message` to refuse it, e.g.
/// a duplicate rank, and then fails itself). Every wait is bounded by the timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// Rank 0's address (host name or IP).
    pub addr: String,
    /// Rank 0's TCP port.
    pub port: u16,
    /// How long rank 0 waits for every rank, and every other rank for rank 0.
    pub timeout: Duration,
}

impl Rendezvous {
    /// A rendezvous at `addr:port` with [`DEFAULT_RENDEZVOUS_TIMEOUT`].
    pub fn new(addr: impl Into<String>, port: u16) -> Self {
        Rendezvous {
            addr: addr.into(),
            port,
            timeout: DEFAULT_RENDEZVOUS_TIMEOUT,
        }
    }

    /// The same rendezvous with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The rendezvous of this process's environment: [`ENV_MASTER_ADDR`] (default
    /// [`DEFAULT_MASTER_ADDR`]) and [`ENV_MASTER_PORT`] (required). Errors name the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env`] over the variables `get` returns.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let addr = get(ENV_MASTER_ADDR)
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_MASTER_ADDR.to_string());
        let port = get(ENV_MASTER_PORT).ok_or_else(|| {
            dist_err(format!(
                "{ENV_MASTER_PORT} is not set: the ranks meet at rank 0's \
                 {ENV_MASTER_ADDR}:{ENV_MASTER_PORT} (flare train --gpus sets both)"
            ))
        })?;
        let port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| {
                dist_err(format!(
                    "{ENV_MASTER_PORT}={port:?} is not a TCP port (1 to 65535)"
                ))
            })?;
        Ok(Rendezvous::new(addr, port))
    }

    fn endpoint(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }

    /// Runs the rendezvous for `world` and returns the blob: rank 0 passes `Some(blob)` and
    /// gets it back once every other rank has received it; the others pass `None` and get
    /// rank 0's. A world of one returns `blob` (or nothing) at once. Errors name the address,
    /// the ranks missing or repeated, and the time waited.
    pub fn share(&self, world: &World, blob: Option<&[u8]>) -> Result<Vec<u8>> {
        if world.is_single() {
            return Ok(blob.map(<[u8]>::to_vec).unwrap_or_default());
        }
        if world.is_main() {
            let blob = blob.ok_or_else(|| dist_err("rank 0 has no blob to share"))?;
            if blob.len() > MAX_BLOB {
                return Err(dist_err(format!(
                    "the rendezvous blob is {} bytes, above {MAX_BLOB}",
                    blob.len()
                )));
            }
            self.serve(world, blob)?;
            Ok(blob.to_vec())
        } else {
            self.join(world)
        }
    }

    /// Rank 0: accepts every other rank, then sends each the blob.
    fn serve(&self, world: &World, blob: &[u8]) -> Result<()> {
        let at = self.endpoint();
        let io = |what: &str| {
            let ctx = format!("rendezvous on {at}: {what}");
            move |source| Error::Io {
                context: ctx,
                source,
            }
        };
        let listener = TcpListener::bind(&at).map_err(io("rank 0 cannot listen"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("rank 0 cannot listen"))?;
        let deadline = Instant::now() + self.timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..world.world_size).map(|_| None).collect();
        let mut joined = 1;
        let result = loop {
            if joined == world.world_size {
                break Ok(());
            }
            match listener.accept() {
                Ok((mut s, from)) => {
                    let hello = s
                        .set_nonblocking(false)
                        .and_then(|_| s.set_read_timeout(Some(remaining(deadline))))
                        .and_then(|_| s.set_write_timeout(Some(remaining(deadline))))
                        .and_then(|_| read_hello(&mut s));
                    let (rank, size) = match hello {
                        Ok(h) => h,
                        // A stranger on the port (or a rank that died mid-hello): not ours.
                        Err(_) => continue,
                    };
                    let refusal = if size != world.world_size {
                        Some(format!(
                            "rank {rank} (from {from}) says {ENV_WORLD_SIZE}={size}, rank 0 has \
                             {ENV_WORLD_SIZE}={}",
                            world.world_size
                        ))
                    } else if rank == 0 || rank >= world.world_size {
                        Some(format!(
                            "a process from {from} says it is rank {rank}, which is not one of \
                             1 to {}",
                            world.world_size - 1
                        ))
                    } else if peers[rank].is_some() {
                        Some(format!(
                            "rank {rank} joined twice (again from {from}): two processes have \
                             {ENV_RANK}={rank}"
                        ))
                    } else {
                        None
                    };
                    if let Some(msg) = refusal {
                        let _ = send_frame(&mut s, 1, msg.as_bytes());
                        break Err(dist_err(format!("rendezvous on {at}: {msg}")));
                    }
                    peers[rank] = Some(s);
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..world.world_size)
                            .filter(|&r| peers[r].is_none())
                            .map(|r| r.to_string())
                            .collect();
                        break Err(dist_err(format!(
                            "rendezvous on {at}: rank(s) {} did not join within {} s",
                            missing.join(", "),
                            self.timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => break Err(io("accepting a rank")(e)),
            }
        };
        match result {
            Ok(()) => {
                for (rank, s) in peers.iter_mut().enumerate() {
                    if let Some(s) = s {
                        send_frame(s, 0, blob)
                            .map_err(io(&format!("sending the blob to rank {rank}")))?;
                    }
                }
                Ok(())
            }
            Err(e) => {
                // The ranks that did join learn why rather than waiting for their timeout.
                let why = e.to_string();
                for s in peers.iter_mut().flatten() {
                    let _ = send_frame(s, 1, why.as_bytes());
                }
                Err(e)
            }
        }
    }

    /// A rank above 0: connects to rank 0 (retrying until the deadline), says who it is, and
    /// reads the blob.
    fn join(&self, world: &World) -> Result<Vec<u8>> {
        let at = self.endpoint();
        let deadline = Instant::now() + self.timeout;
        let mut stream = loop {
            let last_err = match self.connect_once(deadline) {
                Ok(s) => break s,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(dist_err(format!(
                    "rank {} could not reach rank 0 at {at} ({ENV_MASTER_ADDR}:{ENV_MASTER_PORT}) \
                     within {} s: {last_err}",
                    world.rank,
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let io = |what: &str| {
            let ctx = format!("rendezvous with rank 0 at {at}: rank {} {what}", world.rank);
            move |source| Error::Io {
                context: ctx,
                source,
            }
        };
        // Rank 0 answers when the last rank joins, or with its refusal once its own timeout
        // (counted from when it began listening, which may be after this rank connected to a
        // slow-starting rank 0) is over: wait twice that, plus a second, so that rank 0's
        // answer, not this rank's clock, ends the wait.
        let wait = self.timeout * 2 + Duration::from_secs(1);
        stream
            .set_read_timeout(Some(wait))
            .and_then(|_| stream.set_write_timeout(Some(wait)))
            .map_err(io("cannot set timeouts"))?;
        let mut hello = Vec::with_capacity(16);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&(world.rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world.world_size as u32).to_le_bytes());
        stream
            .write_all(&hello)
            .map_err(io("cannot send its rank"))?;
        let (status, body) = read_frame(&mut stream).map_err(io("got no answer"))?;
        if status != 0 {
            return Err(dist_err(format!(
                "rank 0 at {at} refused rank {}: {}",
                world.rank,
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(body)
    }

    /// One try at connecting to every address `addr:port` resolves to.
    fn connect_once(&self, deadline: Instant) -> std::io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = (self.addr.as_str(), self.port).to_socket_addrs()?.collect();
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolves to no address",
        );
        for a in addrs {
            let wait = remaining(deadline).min(Duration::from_secs(5));
            match TcpStream::connect_timeout(&a, wait) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// The time left until `deadline`, at least a millisecond (a zero timeout means "none").
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn bad_data(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads a rank's `MAGIC, rank: u32, world_size: u32`.
fn read_hello(s: &mut TcpStream) -> std::io::Result<(usize, usize)> {
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf)?;
    if &buf[..8] != MAGIC {
        return Err(bad_data("not a flare rendezvous"));
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    Ok((word(8) as usize, word(12) as usize))
}

/// Writes `MAGIC, status: u8, len: u32, body`.
fn send_frame(s: &mut TcpStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(13 + body.len());
    msg.extend_from_slice(MAGIC);
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg)?;
    s.flush()
}

/// Reads a frame of [`send_frame`]: `(status, body)`.
fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 13];
    s.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(bad_data(
            "rank 0 answered with something else than flare's rendezvous",
        ));
    }
    let len = u32::from_le_bytes([head[9], head[10], head[11], head[12]]) as usize;
    if len > MAX_BLOB {
        return Err(bad_data("rank 0's answer is too long"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((head[8], body))
}

/// A free TCP port on this host (the OS picks one; another process may take it before it is
/// used, which the rendezvous then reports as an error): for `flare train --gpus`.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((DEFAULT_MASTER_ADDR, 0)).map_err(|source| Error::Io {
        context: "finding a free TCP port for the rendezvous".into(),
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            context: "finding a free TCP port for the rendezvous".into(),
            source,
        })
}

// ---- the gradient sum -----------------------------------------------------------------------

/// The collective of a run: sums every rank's gradients (and a few scalars, such as the
/// step's loss) so that every rank holds the same totals. A world of one holds nothing and
/// does nothing; a larger one holds an NCCL communicator (feature `nccl`), built once per run.
pub struct Collective {
    world: World,
    backend: Backend,
}

enum Backend {
    Local,
    #[cfg(feature = "nccl")]
    Nccl(crate::runtime::nccl::Comm),
    /// Threads of one test process, to check the trainer's arithmetic on the CPU: never in
    /// the product, which has no collective of its own.
    #[cfg(test)]
    Threads(std::sync::Arc<test_support::ThreadSum>),
}

impl std::fmt::Debug for Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.backend {
            Backend::Local => "local",
            #[cfg(feature = "nccl")]
            Backend::Nccl(_) => "nccl",
            #[cfg(test)]
            Backend::Threads(_) => "threads (test)",
        };
        f.debug_struct("Collective")
            .field("world", &self.world)
            .field("backend", &backend)
            .finish()
    }
}

impl Default for Collective {
    fn default() -> Self {
        Collective::single()
    }
}

impl Collective {
    /// The collective of a world of one.
    pub fn single() -> Self {
        Collective {
            world: World::SINGLE,
            backend: Backend::Local,
        }
    }

    /// The collective of `world` on `device` (this rank's GPU): for a world of one,
    /// [`Self::single`]; otherwise the [`Rendezvous`] shares rank 0's NCCL unique id and each
    /// rank builds its communicator on `device`'s stream (every rank must call this; it
    /// returns once all have). On the CPU, or without the `nccl` feature, a world of more than
    /// one rank is an error, raised before the rendezvous.
    pub fn connect(world: World, device: &Device, rendezvous: &Rendezvous) -> Result<Self> {
        if world.is_single() {
            return Ok(Collective::single());
        }
        let needs = format!(
            "data-parallel training needs CUDA and the nccl feature (this is rank {} of {})",
            world.rank, world.world_size
        );
        #[cfg(feature = "nccl")]
        if let Device::Cuda(dev) = device {
            let comm = crate::runtime::nccl::Comm::connect(&world, dev, rendezvous)?;
            return Ok(Collective {
                world,
                backend: Backend::Nccl(comm),
            });
        }
        let _ = rendezvous;
        let why = if cfg!(feature = "nccl") {
            format!(
                "{needs}: the device is {}",
                crate::error::device_name(device)
            )
        } else {
            format!("{needs}: this flare was built without it (cargo build --features nccl)")
        };
        Err(dist_err(why))
    }

    /// This rank's world.
    pub fn world(&self) -> World {
        self.world
    }

    /// Replaces each rank's `grads` (one per `params`, `None` for a parameter the step did not
    /// reach) and `scalars` by their sums over the ranks, in place: one all-reduce of one flat
    /// f32 buffer ([`flatten`], then [`unflatten`]). A gradient is `None` afterwards only when
    /// it was `None` on every rank. A world of one changes nothing.
    pub fn sum_gradients(
        &self,
        params: &[Var],
        grads: &mut [Option<Tensor>],
        scalars: &mut [f64],
    ) -> Result<()> {
        match &self.backend {
            // Nothing to add: this rank's gradients are the totals.
            Backend::Local => {
                let _ = (params, grads, scalars);
                Ok(())
            }
            #[cfg(feature = "nccl")]
            Backend::Nccl(comm) => {
                let device = params
                    .first()
                    .map(|p| p.device().clone())
                    .unwrap_or(Device::Cpu);
                let flat = flatten(params, grads, scalars, &device)?;
                let summed = comm.all_reduce_sum(&flat)?;
                unflatten(&summed, params, grads, scalars)
            }
            #[cfg(test)]
            Backend::Threads(sum) => {
                let flat = flatten(params, grads, scalars, &Device::Cpu)?;
                let summed = sum.sum(self.world.rank, flat.to_vec1::<f32>()?);
                let summed = Tensor::from_vec(summed, flat.dims(), &Device::Cpu)?;
                unflatten(&summed, params, grads, scalars)
            }
        }
    }
}

/// The bucket of one step: every gradient (zeros for a `None`), in `params`' order, as f32,
/// then one presence flag per parameter (1 where the gradient is `Some`), then `scalars`; one
/// flat f32 tensor on `device`. Summed over the ranks, a flag counts the ranks that had the
/// gradient.
pub fn flatten(
    params: &[Var],
    grads: &[Option<Tensor>],
    scalars: &[f64],
    device: &Device,
) -> Result<Tensor> {
    if grads.len() != params.len() {
        return Err(dist_err(format!(
            "{} gradients for {} parameters",
            grads.len(),
            params.len()
        )));
    }
    let mut parts = Vec::with_capacity(params.len() + 1);
    let mut tail: Vec<f32> = Vec::with_capacity(params.len() + scalars.len());
    for (p, g) in params.iter().zip(grads) {
        let part = match g {
            Some(g) => {
                if g.dims() != p.dims() {
                    return Err(Error::ShapeMismatch {
                        op: "distributed",
                        msg: "a gradient's shape is not its parameter's",
                        lhs: g.dims().to_vec(),
                        rhs: p.dims().to_vec(),
                    });
                }
                g.to_dtype(DType::F32)?.flatten_all()?
            }
            None => Tensor::zeros(p.elem_count(), DType::F32, device)?,
        };
        parts.push(part);
        tail.push(if g.is_some() { 1.0 } else { 0.0 });
    }
    tail.extend(scalars.iter().map(|&s| s as f32));
    parts.push(Tensor::from_vec(
        tail,
        params.len() + scalars.len(),
        device,
    )?);
    Ok(Tensor::cat(&parts, 0)?)
}

/// The inverse of [`flatten`]: writes the gradients (in each parameter's dtype and shape;
/// `None` where no rank had one) and the scalars back from `flat`.
pub fn unflatten(
    flat: &Tensor,
    params: &[Var],
    grads: &mut [Option<Tensor>],
    scalars: &mut [f64],
) -> Result<()> {
    let body: usize = params.iter().map(|p| p.elem_count()).sum();
    let want = body + params.len() + scalars.len();
    if flat.dims() != [want] || grads.len() != params.len() {
        return Err(dist_err(format!(
            "the bucket holds {:?} values, {want} expected ({} parameters, {} gradients, {} \
             scalars)",
            flat.dims(),
            params.len(),
            grads.len(),
            scalars.len()
        )));
    }
    let tail = flat
        .narrow(0, body, params.len() + scalars.len())?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let mut at = 0;
    for (i, (p, g)) in params.iter().zip(grads.iter_mut()).enumerate() {
        let n = p.elem_count();
        *g = if tail[i] > 0.0 {
            Some(
                flat.narrow(0, at, n)?
                    .reshape(p.dims())?
                    .to_dtype(p.dtype())?,
            )
        } else {
            None
        };
        at += n;
    }
    for (s, v) in scalars.iter_mut().zip(&tail[params.len()..]) {
        *s = *v;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A sum over the threads of one test process: each thread plays a rank, so the trainer's
    //! data-parallel arithmetic (shards, the global token count, the sum) is checked on the
    //! CPU against a one-rank run.

    use std::sync::{Arc, Barrier, Mutex};

    use super::{Backend, Collective, World};

    /// The shared state of the ranks' sums.
    pub(crate) struct ThreadSum {
        barrier: Barrier,
        slots: Mutex<Vec<Vec<f32>>>,
    }

    impl ThreadSum {
        /// The sum over every rank's `values`, added in rank order (the same on every rank).
        pub(crate) fn sum(&self, rank: usize, values: Vec<f32>) -> Vec<f32> {
            self.slots.lock().unwrap()[rank] = values;
            self.barrier.wait();
            let total = {
                let slots = self.slots.lock().unwrap();
                let mut total = vec![0f32; slots[0].len()];
                for s in slots.iter() {
                    for (t, v) in total.iter_mut().zip(s) {
                        *t += v;
                    }
                }
                total
            };
            // Nobody writes the next step's values before everyone has read these.
            self.barrier.wait();
            total
        }
    }

    /// One collective per rank of a world of `n` threads.
    pub(crate) fn thread_collectives(n: usize) -> Vec<Collective> {
        let sum = Arc::new(ThreadSum {
            barrier: Barrier::new(n),
            slots: Mutex::new(vec![Vec::new(); n]),
        });
        (0..n)
            .map(|rank| Collective {
                world: World {
                    rank,
                    world_size: n,
                    local_rank: rank,
                },
                backend: Backend::Threads(sum.clone()),
            })
            .collect()
    }
}

/// What one GPU allows of NCCL: a communicator of one rank, built through the same path as
/// a larger one (unique id, rendezvous, `ncclCommInitRank`), whose all-reduce must give the
/// bucket back unchanged. Skipped without a CUDA device.
#[cfg(all(test, feature = "nccl"))]
mod nccl_tests {
    use super::*;

    #[test]
    fn a_one_rank_communicator_sums_to_the_bucket() {
        let Ok(device) = Device::new_cuda(0) else {
            eprintln!("skipped: no CUDA device");
            return;
        };
        let Device::Cuda(dev) = &device else {
            unreachable!("new_cuda gives a CUDA device")
        };
        let rv = Rendezvous::new(DEFAULT_MASTER_ADDR, free_port().unwrap());
        let comm = crate::runtime::nccl::Comm::connect(&World::SINGLE, dev, &rv).unwrap();
        let c = Collective {
            world: World::SINGLE,
            backend: Backend::Nccl(comm),
        };
        let p0 = Var::zeros((3, 2), DType::F32, &device).unwrap();
        let p1 = Var::zeros(5, DType::F32, &device).unwrap();
        let g0: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let g0 = Tensor::from_vec(g0, (3, 2), &device).unwrap();
        let mut grads = vec![Some(g0.clone()), None];
        let mut loss = [1.25];
        c.sum_gradients(&[p0, p1], &mut grads, &mut loss).unwrap();
        assert_eq!(loss, [1.25]);
        assert!(grads[1].is_none());
        assert_eq!(
            grads[0].as_ref().unwrap().to_vec2::<f32>().unwrap(),
            g0.to_vec2::<f32>().unwrap()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(map: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = map
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    fn world_err(map: &[(&str, &str)]) -> String {
        World::from_vars(vars(map)).unwrap_err().to_string()
    }

    #[test]
    fn world_from_the_environment() {
        assert_eq!(World::from_vars(vars(&[])).unwrap(), World::SINGLE);
        // LOCAL_RANK alone (a stray variable) does not make a world.
        assert_eq!(
            World::from_vars(vars(&[("LOCAL_RANK", "3")])).unwrap(),
            World::SINGLE
        );
        let w = World::from_vars(vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
        ]))
        .unwrap();
        assert_eq!(
            w,
            World {
                rank: 5,
                world_size: 8,
                local_rank: 1
            }
        );
        assert!(!w.is_single() && !w.is_main());
    }

    #[test]
    fn bad_worlds_name_the_variable_and_value() {
        let e = world_err(&[("RANK", "1")]);
        assert!(e.contains("WORLD_SIZE is not set"), "{e}");
        let e = world_err(&[("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(e.contains("RANK is not set"), "{e}");
        let e = world_err(&[("RANK", "two"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]);
        assert!(
            e.contains("RANK=\"two\"") && e.contains("not a non-negative integer"),
            "{e}"
        );
        let e = world_err(&[("RANK", "-1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]);
        assert!(e.contains("RANK=\"-1\""), "{e}");
        let e = world_err(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]);
        assert!(e.contains("RANK=4 is not below WORLD_SIZE=4"), "{e}");
        let e = world_err(&[("RANK", "0"), ("WORLD_SIZE", "0"), ("LOCAL_RANK", "0")]);
        assert!(e.contains("WORLD_SIZE=0"), "{e}");
        let e = world_err(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
        assert!(e.contains("LOCAL_RANK is not set"), "{e}");
        let e = world_err(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "x1")]);
        assert!(e.contains("LOCAL_RANK=\"x1\""), "{e}");
        let e = world_err(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "2")]);
        assert!(e.contains("LOCAL_RANK=2 is above RANK=1"), "{e}");
        assert!(e.starts_with("data-parallel training: "), "{e}");
    }

    #[test]
    fn rendezvous_settings_from_the_environment() {
        let r = Rendezvous::from_vars(vars(&[("FLARE_MASTER_PORT", "29500")])).unwrap();
        assert_eq!((r.addr.as_str(), r.port), ("127.0.0.1", 29500));
        assert_eq!(r.timeout, DEFAULT_RENDEZVOUS_TIMEOUT);
        let r = Rendezvous::from_vars(vars(&[
            ("FLARE_MASTER_ADDR", "node0"),
            ("FLARE_MASTER_PORT", "7"),
        ]))
        .unwrap();
        assert_eq!((r.addr.as_str(), r.port), ("node0", 7));
        let e = Rendezvous::from_vars(vars(&[])).unwrap_err().to_string();
        assert!(e.contains("FLARE_MASTER_PORT is not set"), "{e}");
        for bad in ["0", "65536", "http"] {
            let e = Rendezvous::from_vars(vars(&[("FLARE_MASTER_PORT", bad)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("FLARE_MASTER_PORT=\"{bad}\"")), "{e}");
        }
    }

    fn world(rank: usize, world_size: usize) -> World {
        World {
            rank,
            world_size,
            local_rank: rank,
        }
    }

    /// Runs the rendezvous of ranks `ranks` (each as a thread, rank 0 sharing `blob`) on a
    /// fresh port; returns each rank's result, in the order of `ranks`.
    fn meet(
        world_size: usize,
        ranks: &[usize],
        blob: &[u8],
        timeout: Duration,
    ) -> Vec<Result<Vec<u8>>> {
        let rv = Rendezvous::new("127.0.0.1", free_port().unwrap()).with_timeout(timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|&r| {
                    let rv = rv.clone();
                    s.spawn(move || rv.share(&world(r, world_size), (r == 0).then_some(blob)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn rendezvous_hands_rank_0s_blob_to_every_rank() {
        let blob: Vec<u8> = (0..128).map(|i| (i * 7 % 251) as u8).collect();
        let got = meet(4, &[0, 1, 2, 3], &blob, DEFAULT_RENDEZVOUS_TIMEOUT);
        for (r, g) in got.into_iter().enumerate() {
            assert_eq!(g.unwrap(), blob, "rank {r}");
        }
        // A world of one needs no network.
        let rv = Rendezvous::new("127.0.0.1", 1);
        assert_eq!(rv.share(&World::SINGLE, Some(b"id")).unwrap(), b"id");
    }

    #[test]
    fn rendezvous_refuses_a_duplicate_rank_and_reports_a_missing_one() {
        // Ranks 0, 1, 1 of a world of 3: the second rank 1 is refused, and both sides say why.
        let got = meet(3, &[0, 1, 1], b"id", DEFAULT_RENDEZVOUS_TIMEOUT);
        let errs: Vec<String> = got
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert!(
            errs.iter().any(|e| e.contains("rank 1 joined twice")),
            "{errs:?}"
        );
        assert!(got[0].is_err(), "rank 0 must fail: {errs:?}");
        // Rank 2 of 3 never comes: rank 0 names it once its (short) timeout is over.
        let got = meet(3, &[0, 1], b"id", Duration::from_millis(300));
        let e = got[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("rank(s) 2 did not join"), "{e}");
        let e = got[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("refused rank 1") && e.contains("did not join"),
            "{e}"
        );
    }

    #[test]
    fn rendezvous_refuses_another_world_size_and_names_an_unreachable_rank_0() {
        let rv = Rendezvous::new("127.0.0.1", free_port().unwrap());
        let (r0, r1) = std::thread::scope(|s| {
            let a = s.spawn(|| rv.share(&world(0, 2), Some(b"id")));
            let b = s.spawn(|| rv.share(&world(1, 3), None));
            (a.join().unwrap(), b.join().unwrap())
        });
        let e = r0.unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE=3, rank 0 has WORLD_SIZE=2"), "{e}");
        assert!(r1.unwrap_err().to_string().contains("refused rank 1"));
        // Nobody listens: the error names the address and the variables.
        let port = free_port().unwrap();
        let rv = Rendezvous::new("127.0.0.1", port).with_timeout(Duration::from_millis(200));
        let e = rv.share(&world(1, 2), None).unwrap_err().to_string();
        assert!(
            e.contains(&format!("could not reach rank 0 at 127.0.0.1:{port}"))
                && e.contains("FLARE_MASTER_ADDR:FLARE_MASTER_PORT"),
            "{e}"
        );
    }

    #[test]
    fn a_larger_world_needs_cuda_and_nccl() {
        let rv = Rendezvous::new("127.0.0.1", 1);
        assert!(Collective::connect(World::SINGLE, &Device::Cpu, &rv).is_ok());
        let e = Collective::connect(world(1, 2), &Device::Cpu, &rv)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data-parallel training needs CUDA and the nccl feature")
                && e.contains("rank 1 of 2"),
            "{e}"
        );
    }

    /// A parameter of shape `dims` and a gradient of it filled from `seed`.
    fn param_and_grad(dims: &[usize], seed: f32) -> (Var, Tensor) {
        let n: usize = dims.iter().product();
        let p = Var::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let g: Vec<f32> = (0..n).map(|i| seed + i as f32 * 0.25).collect();
        (p, Tensor::from_vec(g, dims, &Device::Cpu).unwrap())
    }

    #[test]
    fn the_bucket_round_trips_and_its_sum_is_the_sum_of_the_gradients() {
        let (p0, g0) = param_and_grad(&[2, 3], 1.0);
        let (p1, g1) = param_and_grad(&[4], -2.0);
        let (p2, _) = param_and_grad(&[3, 1], 0.0);
        let params = vec![p0, p1, p2];
        // Rank a has gradients for p0 and p1, rank b for p0 only; nobody for p2.
        let a = vec![Some(g0.clone()), Some(g1.clone()), None];
        let b = vec![Some((&g0 * 3.0).unwrap()), None, None];
        let fa = flatten(&params, &a, &[1.5], &Device::Cpu).unwrap();
        let fb = flatten(&params, &b, &[0.25], &Device::Cpu).unwrap();
        assert_eq!(fa.dims(), [6 + 4 + 3 + 3 + 1]);
        // Round trip of one rank's bucket.
        let mut back = vec![None, None, None];
        let mut s = [0.0];
        unflatten(&fa, &params, &mut back, &mut s).unwrap();
        assert_eq!(s, [1.5]);
        assert_eq!(
            back[0].as_ref().unwrap().to_vec2::<f32>().unwrap(),
            g0.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            back[1].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            g1.to_vec1::<f32>().unwrap()
        );
        assert!(back[2].is_none());
        // What the all-reduce computes, element by element: the sums per parameter.
        let sum = (fa + fb).unwrap();
        let mut total = vec![None, None, None];
        let mut s = [0.0];
        unflatten(&sum, &params, &mut total, &mut s).unwrap();
        assert_eq!(s, [1.75]);
        assert_eq!(
            total[0].as_ref().unwrap().to_vec2::<f32>().unwrap(),
            (&g0 * 4.0).unwrap().to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            total[1].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            g1.to_vec1::<f32>().unwrap()
        );
        assert!(total[2].is_none(), "no rank had a gradient for p2");
        // A gradient of the wrong shape, or a bucket of the wrong size, is refused.
        let wrong = vec![Some(g1.clone()), None, None];
        assert!(flatten(&params, &wrong, &[], &Device::Cpu).is_err());
        assert!(unflatten(&sum, &params, &mut total, &mut []).is_err());
    }

    #[test]
    fn a_single_collective_leaves_the_gradients_alone() {
        let (p, g) = param_and_grad(&[2], 1.0);
        let mut grads = vec![Some(g.clone()), None];
        let params = vec![p.clone(), p];
        let mut loss = [2.5];
        Collective::single()
            .sum_gradients(&params, &mut grads, &mut loss)
            .unwrap();
        assert_eq!(loss, [2.5]);
        assert!(grads[1].is_none());
        assert_eq!(
            grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            g.to_vec1::<f32>().unwrap()
        );
    }

    proptest! {
        #[test]
        fn shards_are_disjoint_balanced_and_cover_the_list_in_order(
            len in 0usize..500,
            world_size in 1usize..17,
        ) {
            let mut joined = Vec::new();
            let mut sizes = Vec::new();
            for rank in 0..world_size {
                let r = shard_range(len, rank, world_size);
                prop_assert!(r.start <= r.end && r.end <= len);
                sizes.push(r.len());
                joined.extend(r);
            }
            // Concatenated in rank order: exactly 0..len (so disjoint and covering).
            prop_assert_eq!(joined, (0..len).collect::<Vec<_>>());
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "sizes {:?}", sizes);
        }
    }
}
