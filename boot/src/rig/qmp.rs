//! The host side of L2's QMP monitor: a line-oriented client for QEMU's machine protocol, spoken over the byte
//! stream the rig carries from L2's QEMU (on L1's third serial port) to a unix socket on the host.
//!
//! QMP sends one JSON object per line: a greeting (`{"QMP": ...}`), then for each command either
//! `{"return": ...}` or `{"error": {"class", "desc"}}`, with asynchronous `{"event": ...}` lines in between.
//! Every line in both directions is kept in a transcript (`-> ` sent, `<- ` received).

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::json::Json;

/// What went wrong talking QMP.
#[derive(Debug)]
pub enum QmpError {
    /// Reading from or writing to the stream failed.
    Io(io::Error),
    /// No complete answer came within the time allowed.
    Timeout {
        /// What the client was waiting for.
        waiting_for: String,
    },
    /// The stream ended (L2's QEMU or the whole run stopped).
    Closed,
    /// A line that is not a JSON object.
    Malformed {
        /// The line as received.
        line: String,
    },
    /// QEMU answered a command with an error.
    Command {
        /// The command sent.
        command: String,
        /// QMP's error class, e.g. `GenericError` or `DeviceNotActive`.
        class: String,
        /// QMP's human-readable description.
        desc: String,
    },
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpError::Io(error) => write!(f, "QMP stream error: {error}"),
            QmpError::Timeout { waiting_for } => {
                write!(f, "QMP: timed out waiting for {waiting_for}")
            }
            QmpError::Closed => f.write_str("QMP: the stream closed (L2's QEMU or the run ended)"),
            QmpError::Malformed { line } => write!(f, "QMP: not a JSON object: {line:?}"),
            QmpError::Command { command, class, desc } => write!(f, "QMP command {command} failed: {class}: {desc}"),
        }
    }
}

impl std::error::Error for QmpError {}

impl From<io::Error> for QmpError {
    fn from(error: io::Error) -> QmpError {
        QmpError::Io(error)
    }
}

/// A QMP connection to L2's QEMU, in command mode after [`Qmp::handshake`].
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    transcript: Arc<Mutex<Vec<String>>>,
    events: Vec<Json>,
    greeting: Option<Json>,
    ready: bool,
}

impl Qmp {
    /// Wraps a connected stream; lines sent and received are appended to `transcript`.
    pub fn new(stream: UnixStream, transcript: Arc<Mutex<Vec<String>>>) -> io::Result<Qmp> {
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Qmp { writer: stream, reader, transcript, events: Vec::new(), greeting: None, ready: false })
    }

    /// Waits (up to `timeout`) for QEMU's greeting, then enters command mode with `qmp_capabilities`.
    /// Does nothing if already done. The greeting comes when L2's QEMU starts, so this also waits for that.
    pub fn handshake(&mut self, timeout: Duration) -> Result<&Json, QmpError> {
        let deadline = Instant::now() + timeout;
        while self.greeting.is_none() {
            let message = self.read_message(deadline, "QEMU's QMP greeting")?;
            if message.get("QMP").is_some() {
                self.greeting = Some(message);
            }
        }
        if !self.ready {
            self.send_and_wait("qmp_capabilities", None, deadline)?;
            self.ready = true;
        }
        Ok(self.greeting.as_ref().expect("set in the loop above"))
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns the value of its `return`,
    /// waiting up to `timeout` (the handshake, if not yet done, shares that time).
    pub fn execute(&mut self, command: &str, arguments: Option<Json>, timeout: Duration) -> Result<Json, QmpError> {
        let deadline = Instant::now() + timeout;
        if !self.ready {
            self.handshake(timeout)?;
        }
        self.send_and_wait(command, arguments, deadline)
    }

    /// The asynchronous events received so far (e.g. `BALLOON_CHANGE`, `HV_BALLOON_STATUS_REPORT`).
    pub fn events(&self) -> &[Json] {
        &self.events
    }

    /// Reads lines until `deadline` or until an event named `name` has arrived, and returns it
    /// (an event that arrived earlier counts). Other events are kept in [`Qmp::events`].
    pub fn wait_for_event(&mut self, name: &str, timeout: Duration) -> Result<Json, QmpError> {
        let deadline = Instant::now() + timeout;
        let is_wanted = |event: &Json| event.get("event").and_then(Json::as_str) == Some(name);
        if let Some(event) = self.events.iter().find(|event| is_wanted(event)) {
            return Ok(event.clone());
        }
        loop {
            let message = self.read_message(deadline, &format!("QMP event {name}"))?;
            if message.get("event").is_some() && is_wanted(&message) {
                return Ok(message);
            }
        }
    }

    fn send_and_wait(&mut self, command: &str, arguments: Option<Json>, deadline: Instant) -> Result<Json, QmpError> {
        let mut request = vec![("execute", Json::from(command))];
        if let Some(arguments) = arguments {
            request.push(("arguments", arguments));
        }
        let line = Json::object(request).to_string();
        self.record(format!("-> {line}"));
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\r\n")?;
        self.writer.flush()?;
        loop {
            let message = self.read_message(deadline, &format!("the answer to {command}"))?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |name| error.get(name).and_then(Json::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            // Events were stored by read_message; a late greeting is ignored.
        }
    }

    /// Reads the next JSON object, storing events. Blank lines and partial garbage before the first `{`
    /// (a serial line can carry noise from before L2's QEMU opened it) are skipped.
    fn read_message(&mut self, deadline: Instant, waiting_for: &str) -> Result<Json, QmpError> {
        let mut line = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout { waiting_for: waiting_for.to_owned() });
            }
            self.reader.get_ref().set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if line.ends_with(b"\n") => {
                    let text = String::from_utf8_lossy(&line).trim().to_owned();
                    line.clear();
                    let Some(start) = text.find('{') else {
                        continue;
                    };
                    let json_text = &text[start..];
                    self.record(format!("<- {json_text}"));
                    let message =
                        Json::parse(json_text).map_err(|_| QmpError::Malformed { line: json_text.to_owned() })?;
                    if !matches!(message, Json::Object(_)) {
                        return Err(QmpError::Malformed { line: json_text.to_owned() });
                    }
                    if message.get("event").is_some() {
                        self.events.push(message.clone());
                    }
                    return Ok(message);
                }
                // A partial line at end of stream or after a timeout: keep it and read on.
                Ok(_) => continue,
                Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(QmpError::Io(error)),
            }
        }
    }

    fn record(&self, line: String) {
        if let Ok(mut transcript) = self.transcript.lock() {
            transcript.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A scripted QEMU: sends the greeting, then answers each line it reads with the next canned reply.
    fn scripted_peer(peer: UnixStream, replies: Vec<&'static str>) -> thread::JoinHandle<Vec<String>> {
        thread::spawn(move || {
            let mut writer = peer.try_clone().unwrap();
            let mut reader = BufReader::new(peer);
            writer.write_all(b"\x00garbage\r\n{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").unwrap();
            let mut received = Vec::new();
            for reply in replies {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                received.push(line.trim().to_owned());
                writer.write_all(reply.as_bytes()).unwrap();
            }
            received
        })
    }

    #[test]
    fn handshakes_executes_and_keeps_a_transcript() {
        let (client, peer) = UnixStream::pair().unwrap();
        let peer = scripted_peer(
            peer,
            vec![
                "{\"return\": {}}\r\n",
                "{\"event\": \"BALLOON_CHANGE\", \"data\": {\"actual\": 1}}\r\n{\"return\": {\"actual\": 536870912}}\r\n",
                "{\"error\": {\"class\": \"DeviceNotActive\", \"desc\": \"No balloon device has been activated\"}}\r\n",
            ],
        );
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let mut qmp = Qmp::new(client, transcript.clone()).unwrap();
        let answer = qmp.execute("query-balloon", None, Duration::from_secs(5)).unwrap();
        assert_eq!(answer.get("actual").and_then(Json::as_i64), Some(536_870_912));
        assert_eq!(qmp.events().len(), 1);
        let error = qmp
            .execute("balloon", Some(Json::object([("value", Json::from(1_i64 << 28))])), Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(&error, QmpError::Command { class, .. } if class == "DeviceNotActive"),
            "unexpected error {error}"
        );
        let received = peer.join().unwrap();
        assert_eq!(
            received,
            [
                r#"{"execute": "qmp_capabilities"}"#,
                r#"{"execute": "query-balloon"}"#,
                r#"{"execute": "balloon", "arguments": {"value": 268435456}}"#
            ]
        );
        let transcript = transcript.lock().unwrap();
        assert_eq!(transcript.first().map(String::as_str), Some(r#"<- {"QMP": {"version": {}, "capabilities": []}}"#));
        assert_eq!(transcript.iter().filter(|line| line.starts_with("-> ")).count(), 3);
        assert_eq!(transcript.len(), 8);
    }

    #[test]
    fn reports_a_timeout_and_a_closed_stream() {
        let (client, peer) = UnixStream::pair().unwrap();
        let mut qmp = Qmp::new(client, Arc::new(Mutex::new(Vec::new()))).unwrap();
        let error = qmp.handshake(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(error, QmpError::Timeout { .. }), "{error}");
        drop(peer);
        assert!(matches!(qmp.handshake(Duration::from_secs(5)).unwrap_err(), QmpError::Closed));
    }
}
