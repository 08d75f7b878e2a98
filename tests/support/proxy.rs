//! A TCP proxy that can cut, stall and close connections on purpose.

#![allow(dead_code)]

use std::time::Duration;

/// A TCP proxy for network-fault tests: it forwards to a server and can cut every
/// connection (as a network partition or a reset would), stall them (bytes stop
/// flowing, sockets stay open), and resume.
pub struct Proxy {
    pub port: u16,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While set, every second new connection is closed at once (its server is
    /// "down"), the others pass.
    flaky: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flaky = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let accept = {
            let (stalled, conns, flaky) = (stalled.clone(), conns.clone(), flaky.clone());
            tokio::spawn(async move {
                let mut accepted = 0u64;
                while let Ok((client, _)) = listener.accept().await {
                    accepted += 1;
                    if flaky.load(Ordering::Relaxed) && accepted.is_multiple_of(2) {
                        drop(client);
                        continue;
                    }
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    for (mut r, mut w) in [
                        (
                            Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                            Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        ),
                        (Box::new(sr), Box::new(cw)),
                    ] {
                        let stalled = stalled.clone();
                        let task = tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = match r.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                while stalled.load(Ordering::Relaxed) {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                if w.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = w.shutdown().await;
                        });
                        conns
                            .lock()
                            .expect("proxy connections")
                            .push(task.abort_handle());
                    }
                }
            })
        };
        Proxy {
            port,
            stalled,
            flaky,
            conns,
            accept,
        }
    }

    /// Closes every second new connection at once while `on` (see `flaky`).
    pub fn flaky(&self, on: bool) {
        self.flaky.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes every connection through the proxy; new ones are accepted again.
    pub fn cut(&self) {
        for c in self.conns.lock().expect("proxy connections").drain(..) {
            c.abort();
        }
    }

    /// Stops forwarding bytes, keeping the connections open.
    pub fn stall(&self) {
        self.stalled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.stalled
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
