//! A proxy's tasks: accepting connections and relaying each one as the mode says.

use std::future::{pending, poll_fn};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::listener::{OpenGuard, Shared};
use super::mode::{Control, FaultMode};

/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction (bounds memory under
/// [`FaultMode::Latency`]: at most `QUEUE_CHUNKS * CHUNK` = 4 MiB).
const QUEUE_CHUNKS: usize = 256;

pub(super) async fn accept_loop(shared: Arc<Shared>, mut control: watch::Receiver<Control>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = poll_fn(|cx| shared.poll_accept(cx)) => match accepted {
                Ok(client) => {
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    let open = OpenGuard::new(Arc::clone(&shared));
                    let resets = control.borrow().resets;
                    let control = control.clone();
                    connections.spawn(async move {
                        let _open = open;
                        serve(client, control, resets).await;
                    });
                }
                // E.g. out of file descriptors: do not spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // A mode change may have replaced the listener; the proxy was
            // dropped if the sender is gone.
            changed = control.changed() => if changed.is_err() {
                return;
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// How a connection ends.
enum Ending {
    /// Close normally (FIN).
    Close,
    /// Close the client side with a RST.
    ResetClient,
}

async fn serve(mut client: TcpStream, control: watch::Receiver<Control>, resets: u64) {
    let _ = client.set_nodelay(true);
    if let Ending::ResetClient = relay(&mut client, control, resets).await {
        let _ = client.set_zero_linger();
    }
}

/// Resolves when the connection must be reset ([`Ending::ResetClient`]) or
/// the proxy was dropped ([`Ending::Close`]).
async fn until_reset(mut control: watch::Receiver<Control>, resets: u64) -> Ending {
    loop {
        if control.borrow_and_update().must_reset(resets) {
            return Ending::ResetClient;
        }
        if control.changed().await.is_err() {
            return Ending::Close;
        }
    }
}

async fn relay(
    client: &mut TcpStream,
    mut control: watch::Receiver<Control>,
    resets: u64,
) -> Ending {
    // Until the first mode other than Blackhole, there is no connection to
    // the target: what the client sends is discarded. The target is the one
    // of that moment (a connection accepted before a retarget is reset).
    let mut client_done = false;
    let mut buf = vec![0; CHUNK];
    let mut server = loop {
        let now = *control.borrow_and_update();
        if now.must_reset(resets) {
            return Ending::ResetClient;
        }
        if now.mode != FaultMode::Blackhole {
            if client_done {
                // The client closed (or failed) while blackholed.
                return Ending::Close;
            }
            tokio::select! {
                connected = TcpStream::connect(now.target) => match connected {
                    Ok(server) => break server,
                    // As if the server had refused the client.
                    Err(_) => return Ending::ResetClient,
                },
                ending = until_reset(control.clone(), resets) => return ending,
            }
        }
        tokio::select! {
            changed = control.changed() => if changed.is_err() {
                return Ending::Close;
            },
            read = client.read(&mut buf), if !client_done => {
                client_done = !matches!(read, Ok(n) if n > 0);
            }
        }
    };
    drop(buf);
    let _ = server.set_nodelay(true);

    let mut failed = false;
    let ending = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(client_read, server_write, control.clone());
        let down = pump(server_read, client_write, control.clone());
        let both = async move { tokio::try_join!(up, down) };
        tokio::select! {
            done = both => match done {
                Ok(_) => Ending::Close,
                Err(_) => {
                    failed = true;
                    Ending::ResetClient
                }
            },
            ending = until_reset(control, resets) => ending,
        }
    };
    if failed {
        // One side failed (e.g. was reset): reset the other side too.
        let _ = server.set_zero_linger();
    }
    ending
}

/// A piece of one direction's stream, stamped with when it arrived.
enum Chunk {
    Data(Instant, Vec<u8>),
    /// End of the stream: EOF (`None`) or a read error.
    End(Instant, Option<io::Error>),
}

/// Copies `from` to `to` as the mode says, until EOF (passed on as a
/// shutdown) or an error (returned). Reading goes on while delivery waits,
/// through a queue of stamped chunks.
async fn pump<R, W>(mut from: R, mut to: W, control: watch::Receiver<Control>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (queue, mut queued) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let reader_control = control.clone();
    let reading = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            let read = from.read(&mut buf).await;
            let arrived = Instant::now();
            let chunk = match read {
                Ok(0) => Chunk::End(arrived, None),
                Ok(n) => {
                    if reader_control.borrow().mode == FaultMode::Blackhole {
                        continue;
                    }
                    Chunk::Data(arrived, buf[..n].to_vec())
                }
                Err(e) => Chunk::End(arrived, Some(e)),
            };
            let end = matches!(chunk, Chunk::End(..));
            if queue.send(chunk).await.is_err() || end {
                break;
            }
        }
        // Keep `queue` alive: the writer stops at the end chunk.
        pending::<()>().await;
    };
    let mut control = control;
    let writing = async move {
        while let Some(chunk) = queued.recv().await {
            match chunk {
                Chunk::Data(arrived, bytes) => {
                    if due(&mut control, arrived, false).await {
                        to.write_all(&bytes).await?;
                    }
                }
                Chunk::End(arrived, error) => {
                    due(&mut control, arrived, true).await;
                    return match error {
                        None => to.shutdown().await,
                        Some(e) => Err(e),
                    };
                }
            }
        }
        Ok(())
    };
    tokio::select! {
        written = writing => written,
        () = reading => Ok(()),
    }
}

/// Waits until a chunk that arrived at `arrived` may be delivered; false if
/// it is to be discarded (data in a blackhole). An end of stream is never
/// discarded: it waits for the blackhole to end. Never returns once the
/// connection is being reset or the proxy is gone (the caller is dropped).
async fn due(control: &mut watch::Receiver<Control>, arrived: Instant, end: bool) -> bool {
    loop {
        let deadline = match control.borrow_and_update().mode {
            FaultMode::Pass => return true,
            FaultMode::Latency(delay) => match arrived.checked_add(delay) {
                Some(at) if at <= Instant::now() => return true,
                at => at,
            },
            FaultMode::Blackhole if !end => return false,
            FaultMode::Blackhole | FaultMode::Reset | FaultMode::Refuse => None,
        };
        let changed = match deadline {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => return true,
                changed = control.changed() => changed,
            },
            None => control.changed().await,
        };
        if changed.is_err() {
            return pending().await;
        }
    }
}
