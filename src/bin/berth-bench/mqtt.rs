//! The broker side: a Mosquitto of the bench's own on a free port, and a
//! subscriber that stamps each message with the wall clock the moment it
//! arrives (the engine's event times are on the same clock).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS, RecvTimeoutError};
use serde_json::Value;

use crate::sys;

/// `mosquitto -p PORT`, killed when dropped.
pub struct Broker {
    port: u16,
    child: Child,
}

impl Broker {
    pub fn start(dir: &Path) -> Result<Broker> {
        Broker::start_as(dir, "mosquitto", |port| {
            let mut command = Command::new("mosquitto");
            command.args(["-p", &port.to_string()]);
            Ok(command)
        })
    }

    /// A Mosquitto started by `command(port)` for a free port, its output
    /// in `<name>.log`; tried again on another port if its was taken.
    pub fn start_as(
        dir: &Path,
        name: &str,
        command: impl Fn(u16) -> Result<Command>,
    ) -> Result<Broker> {
        let log = dir.join(format!("{name}.log"));
        let what = if name == "mosquitto" {
            name.to_owned()
        } else {
            format!("mosquitto ({name})")
        };
        // The port may be taken between finding it and binding it.
        for _ in 0..5 {
            let port = free_port()?;
            let mut child = sys::spawn_logged(&mut command(port)?, &log, false)
                .context("mosquitto is needed: run scripts/setup.sh")?;
            let mut exited = false;
            let up = sys::wait_until(
                &format!("{what} to accept connections"),
                Duration::from_secs(15),
                Duration::from_millis(20),
                || {
                    if child.try_wait()?.is_some() {
                        exited = true;
                        return Ok(true);
                    }
                    Ok(port_open(port))
                },
            );
            if let Err(e) = up {
                let _ = child.kill();
                let _ = child.wait();
                sys::untrack_pid(child.id());
                return Err(e.context(sys::tail(&log, 10)));
            }
            if !exited {
                return Ok(Broker { port, child });
            }
            sys::untrack_pid(child.id());
            if !sys::tail(&log, 5).contains("Address already in use") {
                bail!("{what} exited:\n{}", sys::tail(&log, 10));
            }
        }
        bail!("{what} found no free port:\n{}", sys::tail(&log, 10))
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        sys::untrack_pid(self.child.id());
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port")?
        .port())
}

pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// One message, stamped on arrival.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Value,
    pub at: SystemTime,
}

#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
    subscribed: bool,
    error: Option<String>,
}

/// Subscribes to a topic filter (QoS 1, clean session) and keeps every
/// message in the background.
pub struct Subscriber {
    inbox: Arc<Mutex<Inbox>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Returns once the broker has acknowledged the subscription.
    pub fn connect(port: u16, filter: &str) -> Result<Subscriber> {
        let id = format!("berth-bench-{}-{port}", std::process::id());
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_clean_session(true);
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(options, 64);
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let inbox = Arc::clone(&inbox);
            let stop = Arc::clone(&stop);
            let filter = filter.to_owned();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let event = match connection.recv_timeout(Duration::from_millis(250)) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    let at = SystemTime::now();
                    let mut inbox = inbox.lock().unwrap_or_else(PoisonError::into_inner);
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce)
                            {
                                inbox.error = Some(e.to_string());
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => inbox.subscribed = true,
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let payload = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                            inbox.messages.push(Message {
                                topic: p.topic.clone(),
                                payload,
                                at,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            inbox.error = Some(e.to_string());
                            drop(inbox);
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
        };
        let subscriber = Subscriber {
            inbox,
            stop,
            thread: Some(thread),
        };
        sys::wait_until(
            "the MQTT subscription",
            Duration::from_secs(15),
            Duration::from_millis(20),
            || Ok(subscriber.lock().subscribed),
        )
        .with_context(|| format!("last MQTT error: {:?}", subscriber.lock().error))?;
        Ok(subscriber)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` over every message received so far, oldest first.
    pub fn with<T>(&self, f: impl FnOnce(&[Message]) -> T) -> T {
        f(&self.lock().messages)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
