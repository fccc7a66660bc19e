//! Closes accepted gRPC connections without losing what was written last.
//!
//! When hyper is done with a connection (after GOAWAY at shutdown, or when
//! the client goes away) it shuts down the write side and drops the
//! socket. If the client was still writing at that moment (the next
//! messages of a `DeductStream`, a request sent before it read the
//! GOAWAY), the socket holds bytes nobody read, and closing such a socket
//! makes the kernel send a TCP reset and **discard what it has not
//! transmitted yet**: the client loses the last replies and the stream's
//! trailers and sees a broken pipe (`UNKNOWN`) instead of `UNAVAILABLE`,
//! or loses the `ALLOW` of a deduction that is billed.
//!
//! So a [`Lingering`] socket is not closed at once when dropped: a task
//! shuts its write side down (the client reads everything, then EOF),
//! reads and discards what the client still sends until the client closes
//! its side, and only then closes it (a "lingering close", as nginx calls
//! it), for at most [`LINGER`]. `serve` waits for these tasks, within the
//! shutdown grace, before the process exits.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_util::task::TaskTracker;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a closed connection waits for its client to close its side.
pub const LINGER: Duration = Duration::from_secs(2);

/// An accepted connection that closes with a lingering close.
pub struct Lingering {
    /// `None` only once dropped.
    inner: Option<TcpStream>,
    tasks: TaskTracker,
}

impl Lingering {
    /// Wraps an accepted socket; its lingering close runs on `tasks`.
    pub fn new(stream: TcpStream, tasks: TaskTracker) -> Self {
        Lingering {
            inner: Some(stream),
            tasks,
        }
    }

    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(
            self.get_mut()
                .inner
                .as_mut()
                .expect("a Lingering socket is only taken when dropped"),
        )
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Connected for Lingering {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match &self.inner {
            Some(s) => s.connect_info(),
            None => TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.inner.take() else {
            return;
        };
        // Without a runtime there is nothing to linger with: close now.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.tasks.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                // What was written goes out first, then EOF.
                let _ = stream.shutdown().await;
                let mut discard = [0u8; 8192];
                while let Ok(1..) = stream.read(&mut discard).await {}
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The server writes a reply and drops its socket while the client's
    /// last request is unread: the client still reads the whole reply,
    /// then EOF. A plain close here resets the connection (the comparison
    /// below shows the kernel does) and the reply is lost.
    #[tokio::test]
    async fn a_dropped_socket_with_unread_input_still_delivers_its_output() {
        async fn run(linger: bool) -> io::Result<Vec<u8>> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let mut client = TcpStream::connect(listener.local_addr()?).await?;
            let (server, _) = listener.accept().await?;
            let tasks = TaskTracker::new();
            // The client's request, which the server never reads.
            client.write_all(b"unread request").await?;
            let reply = vec![7u8; 256 * 1024];
            let mut server = Lingering::new(server, tasks.clone());
            // Until the request has arrived, so it is unread at the close.
            let mut waiting = [0u8; 1];
            while server.inner.as_ref().unwrap().peek(&mut waiting).await? == 0 {}
            // More than the socket buffers hold: part of it is still in
            // the server's send queue when it closes.
            let writer = tokio::spawn(async move {
                server.write_all(&reply).await?;
                if !linger {
                    // A plain close: take the socket out and drop it.
                    drop(server.inner.take());
                }
                drop(server);
                io::Result::Ok(())
            });
            let mut got = Vec::new();
            let read = client.read_to_end(&mut got).await;
            drop(client);
            writer.await.unwrap()?;
            tasks.close();
            tasks.wait().await;
            read.map(|_| got)
        }
        let got = run(true).await.expect("a lingering close is orderly");
        assert_eq!(got.len(), 256 * 1024);
        assert!(got.iter().all(|b| *b == 7));
        // The failure this guards against, to show the test can fail.
        match run(false).await {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            Ok(got) => assert!(got.len() < 256 * 1024, "a plain close lost nothing"),
        }
    }
}
