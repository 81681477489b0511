//! A TCP relay on loopback that a test can freeze: a stand-in for a network partition
//! between one client and a real server (the real server cannot be cut off from one of
//! its clients while it keeps serving the others). Frozen, it keeps every connection open
//! and passes nothing more, as a partition or a hung peer does: the client sees no error,
//! only silence.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A running relay; it stops when dropped.
#[derive(Debug)]
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until the relay is frozen, then holds both open forever.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    /// Relays connections on a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the relay")?;
        let addr = listener.local_addr()?;
        let frozen = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let frozen = frozen.clone();
            async move {
                let mut held = Vec::new();
                while let Ok((client, _)) = listener.accept().await {
                    if frozen.load(Ordering::SeqCst) {
                        held.push(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(target).await else { continue };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, frozen.clone()));
                    tokio::spawn(pump(sr, cw, frozen.clone()));
                }
            }
        });
        Ok(Relay { addr, frozen, task })
    }

    /// From now on nothing passes, in either direction, on old or new connections.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}
