//! A [`Collective`] over TCP for multi-process runs on the CPU, and the rendezvous every
//! multi-process run starts with (what `torch.distributed`'s gloo backend and its TCP store
//! are to PyTorch): `WORLD_SIZE` processes find rank 0 at `MASTER_ADDR:MASTER_PORT`.
//!
//! A star: every rank keeps one connection to rank 0, which gathers each round's buffers,
//! combines them in rank order exactly as [`InProcess`](super::parallel::InProcess) does
//! (so a run is bit-identical run to run), and sends the result back. That is 2(N-1)
//! messages of the whole buffer through rank 0 per collective: fine for CPU ranks and the
//! reference CNN's 93k gradients, not a ring all-reduce. GPU runs exchange only NCCL's
//! unique id over it ([`TcpGroup::broadcast_bytes`]) and sum with NCCL.
//!
//! Written here rather than taken from a crate: the protocol is five message kinds on
//! `std::net`, and what matters (rank-order sums, failing every rank on a bad round,
//! sizes checked before allocation) is this module's contract, which no small crate keeps.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::parallel::{combine, Collective, Data, Op};
use crate::{Error, Result};

/// Protocol tag and version, first on every connection.
const MAGIC: &[u8; 8] = b"MLOPSDP1";

/// Most values in one collective's buffer (1 GiB of f32, 2 GiB of f64): a length above it
/// is a corrupt or hostile message. Lengths are also checked against the receiver's own
/// buffer before anything is allocated.
const MAX_VALUES: u64 = 1 << 28;

/// The connections of one rank.
enum Links {
    /// Rank 0: one stream per other rank, rank order (index 0 is rank 1).
    Root(Vec<TcpStream>),
    /// Any other rank: its stream to rank 0.
    Peer(TcpStream),
}

/// One process's rank of a TCP group.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    links: Mutex<(Links, Option<String>)>,
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Config(format!("data-parallel TCP group: {what}: {e}"))
}

fn write_u32(w: &mut impl Write, v: u32) -> std::io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn write_data(w: &mut impl Write, data: &Data) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(9 + data_len(data) * 8);
    match data {
        Data::F32(v) => {
            bytes.push(0);
            bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
            v.iter()
                .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
        }
        Data::F64(v) => {
            bytes.push(1);
            bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
            v.iter()
                .for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
        }
    }
    w.write_all(&bytes)
}

fn data_len(data: &Data) -> usize {
    match data {
        Data::F32(v) => v.len(),
        Data::F64(v) => v.len(),
    }
}

/// Reads a buffer that should hold `expected` values. A length above [`MAX_VALUES`] is an
/// I/O error (the stream cannot be trusted further); another length is drained without
/// allocating and answered `Ok(Err(length))`, so the round fails cleanly on every rank.
fn read_data(
    r: &mut impl Read,
    expected: usize,
) -> std::io::Result<std::result::Result<Data, u64>> {
    let kind = read_u8(r)?;
    let len = read_u64(r)?;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let width = match kind {
        0 => 4,
        1 => 8,
        k => return Err(bad(format!("unknown buffer type {k}"))),
    };
    if len > MAX_VALUES {
        return Err(bad(format!(
            "a buffer of {len} values (at most {MAX_VALUES})"
        )));
    }
    if len != expected as u64 {
        std::io::copy(&mut r.take(len * width), &mut std::io::sink())?;
        return Ok(Err(len));
    }
    let mut raw = vec![0u8; expected * width as usize];
    r.read_exact(&mut raw)?;
    Ok(Ok(if kind == 0 {
        Data::F32(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    } else {
        Data::F64(
            raw.chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        )
    }))
}

fn write_op(w: &mut impl Write, op: Op) -> std::io::Result<()> {
    let (code, root) = match op {
        Op::SumF32 => (0u8, 0u32),
        Op::SumF64 => (1, 0),
        Op::Broadcast { root } => (2, root.min(u32::MAX as usize) as u32),
    };
    w.write_all(&[code])?;
    write_u32(w, root)
}

fn read_op(r: &mut impl Read) -> std::io::Result<Op> {
    let code = read_u8(r)?;
    let root = read_u32(r)? as usize;
    match code {
        0 => Ok(Op::SumF32),
        1 => Ok(Op::SumF64),
        2 => Ok(Op::Broadcast { root }),
        c => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown collective {c}"),
        )),
    }
}

fn write_message(w: &mut impl Write, text: &str) -> std::io::Result<()> {
    let text = &text.as_bytes()[..text.len().min(4096)];
    write_u32(w, text.len() as u32)?;
    w.write_all(text)
}

fn read_message(r: &mut impl Read) -> std::io::Result<String> {
    let len = read_u32(r)?.min(4096) as usize;
    let mut text = vec![0u8; len];
    r.read_exact(&mut text)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

fn prepare(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

impl TcpGroup {
    /// Joins the group of `world` ranks as `rank`: rank 0 listens on `addr:port` and
    /// waits for the others, which connect to it (retrying until rank 0 is up), all within
    /// `join_timeout`; each collective then waits at most `timeout` for the others.
    ///
    /// # Errors
    /// [`Error::Config`] when rank 0 cannot listen on `addr:port` (address in use, not
    /// this host's), a rank cannot reach it in time, or a connection announces another
    /// world size, a rank out of range or twice, or is not an mlops rank.
    pub fn join(
        rank: usize,
        world: usize,
        (addr, port): (&str, u16),
        join_timeout: Duration,
        timeout: Duration,
    ) -> Result<TcpGroup> {
        let deadline = Instant::now() + join_timeout;
        let links = if rank == 0 {
            // Every interface, as torch's TCPStore does: MASTER_ADDR is how the others reach
            // this host, which may resolve to loopback here (127.0.1.1 in /etc/hosts).
            let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                Error::Config(format!(
                    "rank 0 cannot listen on port MASTER_PORT={port} ({e}); choose a free port (MASTER_ADDR={addr})"
                ))
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_error("listen", e))?;
            let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut stream, from)) => {
                        // A connection that says nothing must not hold up the join.
                        let left = deadline.saturating_duration_since(Instant::now());
                        let greeting =
                            left.clamp(Duration::from_millis(100), Duration::from_secs(5));
                        prepare(&stream, greeting).map_err(|e| io_error("accept", e))?;
                        let mut magic = [0u8; 8];
                        let hello = stream
                            .read_exact(&mut magic)
                            .and_then(|()| Ok((read_u32(&mut stream)?, read_u32(&mut stream)?)));
                        let problem = match &hello {
                            Err(e) => Some(format!("{from} sent no greeting ({e})")),
                            Ok(_) if &magic != MAGIC => {
                                Some(format!("{from} is not an mlops rank"))
                            }
                            Ok((_, w)) if *w as usize != world => {
                                Some(format!("{from} says WORLD_SIZE={w}, rank 0 has {world}"))
                            }
                            Ok((r, _)) if *r == 0 || *r as usize >= world => {
                                Some(format!("{from} says RANK={r}, out of 1..{world}"))
                            }
                            Ok((r, _)) if slots[*r as usize - 1].is_some() => {
                                Some(format!("RANK={r} joined twice"))
                            }
                            Ok(_) => None,
                        };
                        let _ = stream.write_all(MAGIC);
                        match problem {
                            None => {
                                prepare(&stream, timeout).map_err(|e| io_error("accept", e))?;
                                let _ = stream.write_all(&[0]);
                                let r = hello.map(|(r, _)| r as usize).unwrap_or(1);
                                slots[r - 1] = Some(stream);
                            }
                            Some(problem) => {
                                let _ = stream.write_all(&[1]);
                                let _ = write_message(&mut stream, &problem);
                                if &magic != MAGIC {
                                    continue; // a stray connection, not a rank: ignore it
                                }
                                return Err(Error::Config(format!(
                                    "rank 0: {problem}; every process needs the same WORLD_SIZE and its own RANK"
                                )));
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing: Vec<String> = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(Error::Config(format!(
                                "rank 0 waited {join_timeout:?} on {addr}:{port} for rank(s) {} to join; start every rank with the same MASTER_ADDR/MASTER_PORT",
                                missing.join(", ")
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(io_error("accept", e)),
                }
            }
            Links::Root(slots.into_iter().flatten().collect())
        } else {
            let mut stream = loop {
                match TcpStream::connect((addr, port)) {
                    Ok(stream) => break stream,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Error::Config(format!(
                            "rank {rank} cannot reach rank 0 at MASTER_ADDR:MASTER_PORT = {addr}:{port} within {join_timeout:?} ({e}); is rank 0 running?"
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            // Rank 0 greets connections one at a time: wait for its answer until the join's
            // deadline, then use the collectives' timeout.
            let left = deadline.saturating_duration_since(Instant::now());
            prepare(&stream, left.max(Duration::from_secs(1)))
                .map_err(|e| io_error("connect", e))?;
            let answer = (|| {
                stream.write_all(MAGIC)?;
                write_u32(&mut stream, rank as u32)?;
                write_u32(&mut stream, world as u32)?;
                let mut magic = [0u8; 8];
                stream.read_exact(&mut magic)?;
                if read_u8(&mut stream)? == 0 && &magic == MAGIC {
                    Ok(None)
                } else {
                    Ok(Some(read_message(&mut stream).unwrap_or_default()))
                }
            })()
            .map_err(|e| io_error("greeting rank 0", e))?;
            if let Some(problem) = answer {
                return Err(Error::Config(format!(
                    "rank 0 refused rank {rank}: {problem}"
                )));
            }
            prepare(&stream, timeout).map_err(|e| io_error("connect", e))?;
            Links::Peer(stream)
        };
        Ok(TcpGroup {
            rank,
            world,
            links: Mutex::new((links, None)),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, (Links, Option<String>)>> {
        self.links.lock().map_err(|_| {
            Error::Config(format!(
                "collective on rank {}: a previous collective panicked",
                self.rank
            ))
        })
    }

    fn error(&self, op: Op, problem: &str) -> Error {
        op.error(self.rank, problem)
    }

    /// One round: this rank's `data` for `op` in, the combined result out.
    fn exchange(&self, op: Op, data: Data) -> Result<Data> {
        let mut guard = self.lock()?;
        let (links, broken) = &mut *guard;
        if let Some(why) = broken {
            return Err(self.error(op, why));
        }
        let result = match links {
            Links::Root(peers) => {
                let expected = data_len(&data);
                let mut slots = vec![(op, data)];
                let mut lengths = vec![expected as u64];
                let mut failure = None;
                for (i, peer) in peers.iter_mut().enumerate() {
                    match read_op(peer).and_then(|op| Ok((op, read_data(peer, expected)?))) {
                        Ok((op, Ok(data))) => {
                            lengths.push(expected as u64);
                            slots.push((op, data));
                        }
                        Ok((_, Err(len))) => lengths.push(len),
                        Err(e) => {
                            failure = Some(format!("rank {} is gone ({e})", i + 1));
                            break;
                        }
                    }
                }
                if let Some(why) = failure {
                    // Tell the ranks still there why, then close: none of them waits.
                    for peer in peers.iter_mut() {
                        let _ = peer
                            .write_all(&[1])
                            .and_then(|()| write_message(peer, &why));
                        let _ = peer.shutdown(std::net::Shutdown::Both);
                    }
                    *broken = Some(why.clone());
                    return Err(self.error(op, &why));
                }
                let result = if lengths.iter().any(|&l| l != expected as u64) {
                    let lengths: Vec<String> = lengths.iter().map(u64::to_string).collect();
                    Err(format!(
                        "the ranks' buffers differ in length ({} values, in rank order)",
                        lengths.join(", ")
                    ))
                } else {
                    combine(slots)
                };
                for (i, peer) in peers.iter_mut().enumerate() {
                    let sent = match &result {
                        Ok(data) => peer.write_all(&[0]).and_then(|()| write_data(peer, data)),
                        Err(problem) => peer
                            .write_all(&[1])
                            .and_then(|()| write_message(peer, problem)),
                    };
                    if let Err(e) = sent {
                        *broken = Some(format!("rank {} is gone ({e})", i + 1));
                    }
                }
                result
            }
            Links::Peer(stream) => {
                let answer = (|| -> std::io::Result<std::result::Result<Data, String>> {
                    let mut request = Vec::new();
                    write_op(&mut request, op)?;
                    write_data(&mut request, &data)?;
                    stream.write_all(&request)?;
                    match read_u8(stream)? {
                        0 => Ok(read_data(stream, data_len(&data))?.map_err(|len| {
                            format!("rank 0 answered {len} values for {}", data_len(&data))
                        })),
                        _ => Ok(Err(read_message(stream)?)),
                    }
                })();
                match answer {
                    Ok(result) => result,
                    Err(e) => {
                        let why = format!("rank 0 is gone ({e})");
                        *broken = Some(why.clone());
                        return Err(self.error(op, &why));
                    }
                }
            }
        };
        result.map_err(|problem| self.error(op, &problem))
    }

    /// Rank `root`'s 128 `bytes` to every rank (how the NCCL unique id travels).
    ///
    /// # Errors
    /// As [`Collective::broadcast`].
    pub fn broadcast_bytes(&self, bytes: &mut [u8; 128], root: usize) -> Result<()> {
        let mut words: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        self.broadcast(&mut words, root)?;
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(&words) {
            chunk.copy_from_slice(&word.to_bits().to_le_bytes());
        }
        Ok(())
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        match self.exchange(Op::SumF32, Data::F32(values.to_vec()))? {
            Data::F32(sum) if sum.len() == values.len() => values.copy_from_slice(&sum),
            _ => return Err(self.error(Op::SumF32, "rank 0 answered another buffer")),
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        match self.exchange(Op::SumF64, Data::F64(values.to_vec()))? {
            Data::F64(sum) if sum.len() == values.len() => values.copy_from_slice(&sum),
            _ => return Err(self.error(Op::SumF64, "rank 0 answered another buffer")),
        }
        Ok(())
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        let op = Op::Broadcast { root };
        match self.exchange(op, Data::F32(values.to_vec()))? {
            Data::F32(v) if v.len() == values.len() => values.copy_from_slice(&v),
            _ => return Err(self.error(op, "rank 0 answered another buffer")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Joins rank `rank` of `world` on loopback `port` (20 s to join, 5 s per collective).
    fn join(rank: usize, world: usize, port: u16) -> Result<TcpGroup> {
        TcpGroup::join(
            rank,
            world,
            ("127.0.0.1", port),
            Duration::from_secs(20),
            Duration::from_secs(5),
        )
    }

    fn group(world: usize) -> Vec<TcpGroup> {
        let port = free_port();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| s.spawn(move || join(rank, world, port).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Sums in rank order (as InProcess), f64 totals, broadcast from a non-zero root, and
    /// the 128-byte id bit for bit, over real sockets.
    #[test]
    fn collectives_over_tcp_match_the_in_process_ones() {
        let ranks = group(3);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let mut v = vec![0.1 + r, 1e8 * (r - 1.0), -r];
                        g.all_reduce_sum(&mut v).unwrap();
                        let mut t = [r as f64 * 0.5, 1.0];
                        g.all_reduce_sum_f64(&mut t).unwrap();
                        let mut b = vec![r; 2];
                        g.broadcast(&mut b, 2).unwrap();
                        let mut id = [0u8; 128];
                        if g.rank() == 1 {
                            id.iter_mut()
                                .enumerate()
                                .for_each(|(i, x)| *x = 255 - i as u8);
                        }
                        g.broadcast_bytes(&mut id, 1).unwrap();
                        (v, t, b, id)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let x = |r: f32| 0.1 + r;
        let sum = [(x(0.0) + x(1.0)) + x(2.0), (-1e8f32 + 0.0) + 1e8, -3.0];
        for (v, t, b, id) in &results {
            assert_eq!(v, &sum);
            assert_eq!(t, &[1.5, 3.0]);
            assert_eq!(b, &[2.0, 2.0]);
            assert!(id.iter().enumerate().all(|(i, &x)| x == 255 - i as u8));
        }
    }

    /// Ranks that disagree (buffer lengths) fail on every rank; a rank that exits fails
    /// the others at once instead of hanging.
    #[test]
    fn bad_rounds_and_lost_ranks_fail_every_rank() {
        let ranks = group(2);
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        let mut v = vec![1.0; 2 + g.rank()];
                        g.all_reduce_sum(&mut v).unwrap_err().to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            errors.iter().all(|e| e.contains("differ in length")),
            "{errors:?}"
        );

        let mut ranks = group(2);
        drop(ranks.pop());
        let err = ranks[0].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("rank 1 is gone"), "{err}");
        let again = ranks[0].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(again.contains("rank 1 is gone"), "{again}");
    }

    /// When rank 2 of 3 is gone, rank 1 (waiting for rank 0's answer) learns that rank 2
    /// is gone, not that rank 0 is.
    #[test]
    fn the_remaining_ranks_learn_which_rank_is_gone() {
        let mut ranks = group(3);
        drop(ranks.pop());
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|g| s.spawn(move || g.all_reduce_sum(&mut [1.0]).unwrap_err().to_string()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            errors.iter().all(|e| e.contains("rank 2 is gone")),
            "{errors:?}"
        );
    }

    /// A connection that never greets does not hold up the ranks that do.
    #[test]
    fn a_silent_connection_does_not_block_the_join() {
        let port = free_port();
        let started = Instant::now();
        let ranks: Vec<_> = std::thread::scope(|s| {
            let root = s.spawn(move || join(0, 2, port));
            // A port probe that connects and says nothing, before the real rank.
            let probe = loop {
                if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
                    break c;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            let peer = s.spawn(move || join(1, 2, port));
            let ranks = vec![root.join().unwrap().unwrap(), peer.join().unwrap().unwrap()];
            drop(probe);
            ranks
        });
        assert_eq!(ranks.len(), 2);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
    }

    /// A rank announcing another world size is refused on both sides, naming the setting.
    #[test]
    fn a_rank_with_another_world_size_is_refused() {
        let port = free_port();
        let (root, peer) = std::thread::scope(|s| {
            let root = s.spawn(move || join(0, 2, port).err().unwrap().to_string());
            let peer = s.spawn(move || join(1, 3, port).err().unwrap().to_string());
            (root.join().unwrap(), peer.join().unwrap())
        });
        assert!(root.contains("WORLD_SIZE=3, rank 0 has 2"), "{root}");
        assert!(peer.contains("refused rank 1"), "{peer}");
    }
}
