//! The NBD export of the primary: the sans-I/O session of `ordinal-nbd` driven over glommio
//! sockets, with writes going through [`PrimaryHandle`] (so an NBD write is acknowledged
//! exactly when the protocol's mode allows) and reads served from the local volume.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use ordinal_nbd::{Event, NbdError, ServerConfig, ServerSession};

use crate::primary::{PrimaryHandle, WriteOutcome};

/// Serves the export until the process ends; each client connection is its own task.
pub async fn serve(listen: SocketAddr, handle: PrimaryHandle) {
    let listener = match TcpListener::bind(listen) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("primary: cannot serve NBD on {listen}: {error}");
            std::process::exit(2);
        }
    };
    if let Ok(addr) = listener.local_addr() {
        crate::admin::announce(crate::control::Role::Primary, "serving NBD on", addr);
    }
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(serve_client(stream, handle.clone())).detach();
            }
            Err(error) => {
                eprintln!("primary: NBD accept failed: {error}");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct Connection {
    session: RefCell<ServerSession>,
    wake_writer: glommio::channels::local_channel::LocalSender<()>,
    closing: Cell<bool>,
}

impl Connection {
    fn wake(&self) {
        let _ = self.wake_writer.try_send(());
    }
}

async fn serve_client(stream: TcpStream, handle: PrimaryHandle) {
    let _ = stream.set_nodelay(true);
    let geometry = handle.geometry();
    let config = ServerConfig {
        export_name: "ordinal".into(),
        size_bytes: geometry.volume_bytes,
        read_only: false,
        block_bytes: geometry.sector_bytes.clamp(512, 65536),
        payload_bytes_max: geometry.payload_bytes_max,
    };
    let session = match ServerSession::new(config) {
        Ok(session) => session,
        Err(error) => {
            eprintln!("primary: {error}");
            return;
        }
    };
    let (wake_writer, wakeups) = glommio::channels::local_channel::new_bounded(1);
    let connection = Rc::new(Connection {
        session: RefCell::new(session),
        wake_writer,
        closing: Cell::new(false),
    });
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let writer_connection = connection.clone();
    let writer_task = glommio::spawn_local(async move {
        loop {
            let chunk = writer_connection
                .session
                .borrow()
                .poll_output()
                .map(<[u8]>::to_vec);
            match chunk {
                Some(chunk) => {
                    if writer.write_all(&chunk).await.is_err() {
                        return;
                    }
                    writer_connection
                        .session
                        .borrow_mut()
                        .consume_output(chunk.len());
                }
                None => {
                    let finished = {
                        let session = writer_connection.session.borrow();
                        let done = session.is_closed() || writer_connection.closing.get();
                        done && session.pending_requests() == 0
                    };
                    if finished {
                        let _ = writer.close().await;
                        return;
                    }
                    if wakeups.recv().await.is_none() {
                        return;
                    }
                }
            }
        }
    });
    connection.wake();
    let mut buffer = vec![0u8; 256 << 10];
    let mut filled = 0usize;
    'connection: loop {
        // Parse what we have; stop reading while the session pushes back.
        let used = connection
            .session
            .borrow_mut()
            .handle_input(&buffer[..filled]);
        buffer.copy_within(used..filled, 0);
        filled -= used;
        loop {
            let event = connection.session.borrow_mut().poll_event();
            let Some(event) = event else { break };
            match event {
                Event::Write {
                    handle: cookie,
                    offset,
                    data,
                } => {
                    // Handed over in arrival order, so the primary numbers them in that order.
                    let pending = handle.start_write(offset, data).await;
                    let connection = connection.clone();
                    glommio::spawn_local(async move {
                        let outcome = pending.outcome().await;
                        let mut session = connection.session.borrow_mut();
                        let _ = match outcome {
                            WriteOutcome::Acked { .. } => session.reply_ok(cookie),
                            WriteOutcome::Failed(_) => session.reply_error(cookie, NbdError::Io),
                        };
                        drop(session);
                        connection.wake();
                    })
                    .detach();
                }
                Event::Read {
                    handle: cookie,
                    offset,
                    len,
                } => {
                    let (connection, handle) = (connection.clone(), handle.clone());
                    glommio::spawn_local(async move {
                        let data = handle.read(offset, len as usize).await;
                        let mut session = connection.session.borrow_mut();
                        let _ = match data {
                            Ok(data) => session.reply_read(cookie, &data),
                            Err(_) => session.reply_error(cookie, NbdError::Io),
                        };
                        drop(session);
                        connection.wake();
                    })
                    .detach();
                }
                Event::Flush { handle: cookie } => {
                    let (connection, handle) = (connection.clone(), handle.clone());
                    glommio::spawn_local(async move {
                        let flushed = handle.flush().await;
                        let mut session = connection.session.borrow_mut();
                        let _ = match flushed {
                            Ok(()) => session.reply_ok(cookie),
                            Err(_) => session.reply_error(cookie, NbdError::Io),
                        };
                        drop(session);
                        connection.wake();
                    })
                    .detach();
                }
                Event::Disconnect => {
                    connection.closing.set(true);
                    connection.wake();
                    break 'connection;
                }
                Event::Error(error) => {
                    eprintln!("primary: NBD client broke the protocol: {error:?}");
                    connection.closing.set(true);
                    connection.wake();
                    break 'connection;
                }
            }
        }
        connection.wake();
        if connection.session.borrow().is_closed() {
            break;
        }
        if !connection.session.borrow().wants_input() {
            // Replies in flight will make room; look again shortly.
            glommio::timer::sleep(Duration::from_micros(200)).await;
            continue;
        }
        if filled == buffer.len() {
            glommio::timer::sleep(Duration::from_micros(200)).await;
            continue;
        }
        match reader.read(&mut buffer[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(read) => filled += read,
        }
    }
    connection.closing.set(true);
    connection.wake();
    writer_task.await;
}
