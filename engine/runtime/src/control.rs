//! The control channel: what is said on a fresh connection before anything else.
//!
//! Every connection starts with a mutual challenge-response over a pre-shared key, then the
//! server's verdict, which carries the region descriptors the client may use and the server's
//! geometry and epoch. The key never travels: each side proves it knows it with
//! HMAC-SHA-256 over both sides' fresh 32-byte nonces and the whole hello, so a recorded
//! exchange cannot be replayed and a tampered hello fails the proof.
//!
//! ```text
//! client -> server  Hello     (80 B)  magic, version, role, purpose, nonce_c, client info
//! server -> client  Challenge (72 B)  magic, version, status, role, nonce_s, mac_s
//! client -> server  Proof     (32 B)  mac_c
//! server -> client  Verdict  (288 B)  status, server info, descriptors, message
//! ```
//!
//! Everything is fixed-size, so a peer cannot make us buffer more than a verdict; the whole
//! exchange has a deadline, so a slow-loris peer is cut off. The encoding and the proofs are
//! plain functions; [`client_handshake`], [`server_handshake`] (glommio) and
//! [`blocking_client_handshake`] (std, for the command-line tools) drive them.

use std::io::{Read, Write};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use hmac::{Hmac, Mac};
use ordinal_proto::{Epoch, Geometry};
use sha2::Sha256;

use crate::transport::RegionDescriptor;

/// The version of the control channel and of the transport's frames after it, so that peers
/// that would not understand each other's frames part at the handshake with a clear error.
/// 2: frame header byte 5 carries flags (`transport::FRAME_FLAG_ACK_MAY_WAIT`); version 1
/// refused any nonzero byte there. 3: a refusal's verdict may say that the server has fenced
/// the client's epoch (byte 5, `REFUSAL_FENCED`, and the server's epoch in bytes 8-11), where
/// version 2 left them zero.
pub const CONTROL_VERSION: u16 = 3;
const HELLO_MAGIC: [u8; 4] = *b"ORDC";
const NONCE_BYTES: usize = 32;
const MAC_BYTES: usize = 32;
pub const HELLO_BYTES: usize = 80;
pub const CHALLENGE_BYTES: usize = 72;
pub const PROOF_BYTES: usize = MAC_BYTES;
pub const VERDICT_BYTES: usize = 288;
pub const DESCRIPTORS_MAX: usize = 4;
const DESCRIPTOR_BYTES: usize = 24;
const MESSAGE_BYTES_MAX: usize = 128;

/// How long a peer has to complete the whole exchange.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);

/// The shortest pre-shared key accepted: 16 bytes keep HMAC-SHA-256 beyond brute force.
pub const PSK_BYTES_MIN: usize = 16;

/// Who is speaking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Primary = 1,
    Dr = 2,
    Aux = 3,
    Admin = 4,
}

impl Role {
    fn from_u8(value: u8) -> Option<Role> {
        Some(match value {
            1 => Role::Primary,
            2 => Role::Dr,
            3 => Role::Aux,
            4 => Role::Admin,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Dr => "dr",
            Role::Aux => "aux",
            Role::Admin => "admin",
        }
    }
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// Primary to DR: order batches (SEND) and the DR's acks.
    OrderQp = 1,
    /// Primary to DR: payload one-sided writes into the staging ring.
    DataQp = 2,
    /// Primary to aux: one-sided writes into the status table.
    AuxTable = 3,
    /// DR to aux: notices about the primary, fencing, and one-sided reads of the table.
    AuxWatch = 4,
    /// An operator tool: status and failover requests.
    Admin = 5,
}

impl Purpose {
    fn from_u8(value: u8) -> Option<Purpose> {
        Some(match value {
            1 => Purpose::OrderQp,
            2 => Purpose::DataQp,
            3 => Purpose::AuxTable,
            4 => Purpose::AuxWatch,
            5 => Purpose::Admin,
            _ => return None,
        })
    }
}

/// What each side says about itself: the geometry it was configured with (if it has one) and
/// its epoch, so that a mismatch is refused by name before any data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub geometry: Option<Geometry>,
    pub epoch: Epoch,
}

impl NodeInfo {
    fn encode(&self, out: &mut [u8]) {
        let geometry = self.geometry.unwrap_or(Geometry {
            volume_bytes: 0,
            sector_bytes: 0,
            ring_bytes: 0,
            table_slots: 0,
            payload_bytes_max: 0,
        });
        out[0..8].copy_from_slice(&geometry.volume_bytes.to_le_bytes());
        out[8..16].copy_from_slice(&geometry.ring_bytes.to_le_bytes());
        out[16..20].copy_from_slice(&geometry.sector_bytes.to_le_bytes());
        out[20..24].copy_from_slice(&geometry.table_slots.to_le_bytes());
        out[24..28].copy_from_slice(&geometry.payload_bytes_max.to_le_bytes());
        out[28..32].copy_from_slice(&self.epoch.to_le_bytes());
        out[32..36].copy_from_slice(&u32::from(self.geometry.is_some()).to_le_bytes());
        out[36..40].fill(0);
    }

    fn decode(bytes: &[u8]) -> Result<NodeInfo, ControlError> {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let has_geometry = match u32_at(32) {
            0 => false,
            1 => true,
            other => return Err(ControlError::Malformed(format!("geometry flag {other}"))),
        };
        let geometry = Geometry {
            volume_bytes: u64_at(0),
            ring_bytes: u64_at(8),
            sector_bytes: u32_at(16),
            table_slots: u32_at(20),
            payload_bytes_max: u32_at(24),
        };
        if has_geometry {
            geometry
                .validate()
                .map_err(|error| ControlError::Malformed(format!("peer geometry: {error}")))?;
        }
        Ok(NodeInfo {
            geometry: has_geometry.then_some(geometry),
            epoch: u32_at(28),
        })
    }
}

/// The first message of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    pub purpose: Purpose,
    pub nonce: [u8; NONCE_BYTES],
    pub info: NodeInfo,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[0..4].copy_from_slice(&HELLO_MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6] = self.role as u8;
        out[7] = self.purpose as u8;
        out[8..40].copy_from_slice(&self.nonce);
        self.info.encode(&mut out[40..80]);
        out
    }

    /// Decodes the parts a server needs before authentication. The version is returned even if
    /// it is not ours, so that the server can say which version it speaks.
    pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Result<Hello, ControlError> {
        if bytes[0..4] != HELLO_MAGIC {
            return Err(ControlError::NotOrdinal);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != CONTROL_VERSION {
            return Err(ControlError::Version {
                ours: CONTROL_VERSION,
                theirs: version,
            });
        }
        let role = Role::from_u8(bytes[6])
            .ok_or_else(|| ControlError::Malformed(format!("unknown role {}", bytes[6])))?;
        let purpose = Purpose::from_u8(bytes[7])
            .ok_or_else(|| ControlError::Malformed(format!("unknown purpose {}", bytes[7])))?;
        Ok(Hello {
            version,
            role,
            purpose,
            nonce: bytes[8..40].try_into().expect("32 bytes"),
            info: NodeInfo::decode(&bytes[40..80])?,
        })
    }
}

/// Status byte of a challenge or verdict.
const STATUS_OK: u8 = 0;
const STATUS_REFUSED: u8 = 1;

/// Byte 5 of a refusal's verdict: a refusal of no particular kind.
const REFUSAL_PLAIN: u8 = 0;
/// Byte 5 of a refusal's verdict: the server has fenced the client's epoch (a DR that failed
/// over or is failing over, an aux that fenced a primary which stopped heartbeating); the
/// server's epoch is in bytes 8-11. No retry in the old epoch can succeed: a primary told so
/// stops, as when the DR refuses it in-band or the aux revokes its writes.
const REFUSAL_FENCED: u8 = 1;

/// Why a server refuses a client ([`server_handshake`]'s `decide` returns it as its error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What the client sees (and logs), at most `MESSAGE_BYTES_MAX` bytes of it.
    pub why: String,
    /// Set when the server has fenced the client's epoch: the server's epoch now.
    pub fenced_at: Option<Epoch>,
}

impl From<String> for Refusal {
    fn from(why: String) -> Refusal {
        Refusal {
            why,
            fenced_at: None,
        }
    }
}

impl From<&str> for Refusal {
    fn from(why: &str) -> Refusal {
        Refusal::from(why.to_string())
    }
}
const STATUS_VERSION: u8 = 2;

/// What the server grants an authenticated client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub info: NodeInfo,
    pub descriptors: Vec<RegionDescriptor>,
}

/// Why a handshake failed. Every variant says what to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The peer does not speak ordinal's control protocol at all.
    NotOrdinal,
    Version {
        ours: u16,
        theirs: u16,
    },
    /// A field out of range or inconsistent.
    Malformed(String),
    /// The peer's proof of the key is wrong: the keys differ (or someone is guessing).
    BadKey,
    /// The server refused us, with its reason.
    Refused(String),
    /// The server refused us because it has fenced our epoch; it is at `epoch` now.
    Fenced {
        epoch: Epoch,
        why: String,
    },
    /// The peer did not finish the exchange in time.
    Timeout,
    Io(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::NotOrdinal => write!(f, "the peer is not an ordinal node (bad magic)"),
            ControlError::Version { ours, theirs } => write!(
                f,
                "control protocol version mismatch: we speak {ours}, the peer {theirs}"
            ),
            ControlError::Malformed(why) => write!(f, "malformed control message: {why}"),
            ControlError::BadKey => write!(
                f,
                "authentication failed: the peer does not hold the same pre-shared key"
            ),
            ControlError::Refused(why) | ControlError::Fenced { why, .. } => {
                write!(f, "refused by the peer: {why}")
            }
            ControlError::Timeout => write!(
                f,
                "the peer did not complete the handshake within {} s",
                HANDSHAKE_DEADLINE.as_secs()
            ),
            ControlError::Io(why) => write!(f, "connection failed during the handshake: {why}"),
        }
    }
}

impl std::error::Error for ControlError {}

fn mac(psk: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; MAC_BYTES] {
    let mut hmac = Hmac::<Sha256>::new_from_slice(psk).expect("HMAC takes keys of any length");
    hmac.update(label);
    for part in parts {
        hmac.update(part);
    }
    hmac.finalize().into_bytes().into()
}

fn verify_mac(psk: &[u8], label: &[u8], parts: &[&[u8]], claimed: &[u8]) -> bool {
    let mut hmac = Hmac::<Sha256>::new_from_slice(psk).expect("HMAC takes keys of any length");
    hmac.update(label);
    for part in parts {
        hmac.update(part);
    }
    // Constant-time comparison: timing must not tell a guesser how many bytes were right.
    hmac.verify_slice(claimed).is_ok()
}

const SERVER_LABEL: &[u8] = b"ordinal control v1 server";
const CLIENT_LABEL: &[u8] = b"ordinal control v1 client";

fn encode_challenge(
    status: u8,
    role: Role,
    nonce: &[u8; NONCE_BYTES],
    mac: &[u8; MAC_BYTES],
) -> [u8; CHALLENGE_BYTES] {
    let mut out = [0u8; CHALLENGE_BYTES];
    out[0..4].copy_from_slice(&HELLO_MAGIC);
    out[4..6].copy_from_slice(&CONTROL_VERSION.to_le_bytes());
    out[6] = status;
    out[7] = role as u8;
    out[8..40].copy_from_slice(nonce);
    out[40..72].copy_from_slice(mac);
    out
}

fn encode_verdict(result: &Result<Grant, Refusal>) -> [u8; VERDICT_BYTES] {
    let mut out = [0u8; VERDICT_BYTES];
    out[0..4].copy_from_slice(&HELLO_MAGIC);
    match result {
        Ok(grant) => {
            assert!(grant.descriptors.len() <= DESCRIPTORS_MAX);
            out[4] = STATUS_OK;
            out[5] = grant.descriptors.len() as u8;
            grant.info.encode(&mut out[8..48]);
            for (index, descriptor) in grant.descriptors.iter().enumerate() {
                let at = 48 + index * DESCRIPTOR_BYTES;
                out[at..at + 8].copy_from_slice(&descriptor.addr.to_le_bytes());
                out[at + 8..at + 16].copy_from_slice(&descriptor.len.to_le_bytes());
                out[at + 16..at + 20].copy_from_slice(&descriptor.rkey.to_le_bytes());
                out[at + 20..at + 24].copy_from_slice(&descriptor.access.to_le_bytes());
            }
        }
        Err(refusal) => {
            out[4] = STATUS_REFUSED;
            if let Some(epoch) = refusal.fenced_at {
                out[5] = REFUSAL_FENCED;
                out[8..12].copy_from_slice(&epoch.to_le_bytes());
            }
            let text = truncate_utf8(&refusal.why, MESSAGE_BYTES_MAX);
            out[144..146].copy_from_slice(&(text.len() as u16).to_le_bytes());
            out[160..160 + text.len()].copy_from_slice(text.as_bytes());
        }
    }
    out
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn decode_verdict(bytes: &[u8; VERDICT_BYTES]) -> Result<Grant, ControlError> {
    if bytes[0..4] != HELLO_MAGIC {
        return Err(ControlError::NotOrdinal);
    }
    match bytes[4] {
        STATUS_OK => {
            let count = bytes[5] as usize;
            if count > DESCRIPTORS_MAX {
                return Err(ControlError::Malformed(format!(
                    "{count} region descriptors"
                )));
            }
            let info = NodeInfo::decode(&bytes[8..48])?;
            let mut descriptors = Vec::with_capacity(count);
            for index in 0..count {
                let at = 48 + index * DESCRIPTOR_BYTES;
                let field = |from: usize, to: usize| &bytes[at + from..at + to];
                descriptors.push(RegionDescriptor {
                    addr: u64::from_le_bytes(field(0, 8).try_into().expect("8 bytes")),
                    len: u64::from_le_bytes(field(8, 16).try_into().expect("8 bytes")),
                    rkey: u32::from_le_bytes(field(16, 20).try_into().expect("4 bytes")),
                    access: u32::from_le_bytes(field(20, 24).try_into().expect("4 bytes")),
                });
            }
            Ok(Grant { info, descriptors })
        }
        STATUS_REFUSED => {
            let len =
                (u16::from_le_bytes([bytes[144], bytes[145]]) as usize).min(MESSAGE_BYTES_MAX);
            let text = String::from_utf8_lossy(&bytes[160..160 + len]).into_owned();
            match bytes[5] {
                REFUSAL_PLAIN => Err(ControlError::Refused(text)),
                REFUSAL_FENCED => Err(ControlError::Fenced {
                    epoch: Epoch::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
                    why: text,
                }),
                other => Err(ControlError::Malformed(format!("refusal kind {other}"))),
            }
        }
        other => Err(ControlError::Malformed(format!("verdict status {other}"))),
    }
}

/// The client's side, as steps over bytes: used by both drivers.
struct ClientSteps {
    hello: [u8; HELLO_BYTES],
    psk: Vec<u8>,
}

impl ClientSteps {
    fn new(psk: &[u8], role: Role, purpose: Purpose, info: NodeInfo) -> ClientSteps {
        let hello = Hello {
            version: CONTROL_VERSION,
            role,
            purpose,
            nonce: crate::random_nonce(),
            info,
        };
        ClientSteps {
            hello: hello.encode(),
            psk: psk.to_vec(),
        }
    }

    /// Checks the server's challenge and returns our proof.
    fn answer(&self, challenge: &[u8; CHALLENGE_BYTES]) -> Result<[u8; PROOF_BYTES], ControlError> {
        if challenge[0..4] != HELLO_MAGIC {
            return Err(ControlError::NotOrdinal);
        }
        let version = u16::from_le_bytes([challenge[4], challenge[5]]);
        if challenge[6] == STATUS_VERSION || version != CONTROL_VERSION {
            return Err(ControlError::Version {
                ours: CONTROL_VERSION,
                theirs: version,
            });
        }
        if challenge[6] != STATUS_OK {
            return Err(ControlError::Malformed(format!(
                "challenge status {}",
                challenge[6]
            )));
        }
        let server_nonce = &challenge[8..40];
        if !verify_mac(
            &self.psk,
            SERVER_LABEL,
            &[&self.hello, &challenge[6..8], server_nonce],
            &challenge[40..72],
        ) {
            return Err(ControlError::BadKey);
        }
        Ok(mac(
            &self.psk,
            CLIENT_LABEL,
            &[&self.hello, &challenge[..40]],
        ))
    }
}

fn io_error(error: std::io::Error) -> ControlError {
    ControlError::Io(error.to_string())
}

/// Client side over a glommio stream, within [`HANDSHAKE_DEADLINE`].
pub async fn client_handshake(
    stream: &mut glommio::net::TcpStream,
    psk: &[u8],
    role: Role,
    purpose: Purpose,
    info: NodeInfo,
) -> Result<Grant, ControlError> {
    let steps = ClientSteps::new(psk, role, purpose, info);
    let exchange = async {
        stream.write_all(&steps.hello).await.map_err(io_error)?;
        let mut challenge = [0u8; CHALLENGE_BYTES];
        stream.read_exact(&mut challenge).await.map_err(io_error)?;
        let proof = steps.answer(&challenge)?;
        stream.write_all(&proof).await.map_err(io_error)?;
        let mut verdict = [0u8; VERDICT_BYTES];
        stream.read_exact(&mut verdict).await.map_err(io_error)?;
        decode_verdict(&verdict)
    };
    match glommio::timer::timeout(HANDSHAKE_DEADLINE, async { Ok(exchange.await) }).await {
        Ok(result) => result,
        Err(_) => Err(ControlError::Timeout),
    }
}

/// Client side over a blocking std stream (command-line tools and tests).
pub fn blocking_client_handshake(
    stream: &mut std::net::TcpStream,
    psk: &[u8],
    role: Role,
    purpose: Purpose,
    info: NodeInfo,
) -> Result<Grant, ControlError> {
    let deadline = Some(HANDSHAKE_DEADLINE);
    stream.set_read_timeout(deadline).map_err(io_error)?;
    stream.set_write_timeout(deadline).map_err(io_error)?;
    let steps = ClientSteps::new(psk, role, purpose, info);
    let timeout_or_io = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ControlError::Timeout,
        _ => io_error(error),
    };
    stream.write_all(&steps.hello).map_err(timeout_or_io)?;
    let mut challenge = [0u8; CHALLENGE_BYTES];
    stream.read_exact(&mut challenge).map_err(timeout_or_io)?;
    let proof = steps.answer(&challenge)?;
    stream.write_all(&proof).map_err(timeout_or_io)?;
    let mut verdict = [0u8; VERDICT_BYTES];
    stream.read_exact(&mut verdict).map_err(timeout_or_io)?;
    decode_verdict(&verdict)
}

/// Server side: authenticates the client, then asks `decide` what to grant the hello (an `Err`
/// is a refusal whose text the client sees). Returns the client's hello on success. A failure
/// is answered (when the client got far enough to understand an answer) and returned.
pub async fn server_handshake(
    stream: &mut glommio::net::TcpStream,
    psk: &[u8],
    our_role: Role,
    decide: impl FnOnce(&Hello) -> Result<Grant, Refusal>,
) -> Result<Hello, ControlError> {
    let exchange = async {
        let mut hello_bytes = [0u8; HELLO_BYTES];
        stream
            .read_exact(&mut hello_bytes)
            .await
            .map_err(io_error)?;
        let hello = match Hello::decode(&hello_bytes) {
            Ok(hello) => hello,
            Err(error @ ControlError::Version { .. }) => {
                let refusal = encode_challenge(STATUS_VERSION, our_role, &[0; 32], &[0; 32]);
                let _ = stream.write_all(&refusal).await;
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let nonce = crate::random_nonce();
        let status_role = [STATUS_OK, our_role as u8];
        let server_mac = mac(psk, SERVER_LABEL, &[&hello_bytes, &status_role, &nonce]);
        let challenge = encode_challenge(STATUS_OK, our_role, &nonce, &server_mac);
        stream.write_all(&challenge).await.map_err(io_error)?;
        let mut proof = [0u8; PROOF_BYTES];
        stream.read_exact(&mut proof).await.map_err(io_error)?;
        if !verify_mac(psk, CLIENT_LABEL, &[&hello_bytes, &challenge[..40]], &proof) {
            let verdict = encode_verdict(&Err("authentication failed".into()));
            let _ = stream.write_all(&verdict).await;
            return Err(ControlError::BadKey);
        }
        let decision = decide(&hello);
        stream
            .write_all(&encode_verdict(&decision))
            .await
            .map_err(io_error)?;
        match decision {
            Ok(_) => Ok(hello),
            Err(refusal) => Err(ControlError::Refused(refusal.why)),
        }
    };
    match glommio::timer::timeout(HANDSHAKE_DEADLINE, async { Ok(exchange.await) }).await {
        Ok(result) => result,
        Err(_) => Err(ControlError::Timeout),
    }
}

/// Compares two geometries field by field and names the first difference.
pub fn geometry_mismatch(ours: &Geometry, theirs: &Geometry) -> Option<String> {
    let fields: [(&str, u64, u64); 5] = [
        (
            "volume size (bytes)",
            ours.volume_bytes,
            theirs.volume_bytes,
        ),
        (
            "sector size (bytes)",
            u64::from(ours.sector_bytes),
            u64::from(theirs.sector_bytes),
        ),
        (
            "staging ring size (bytes)",
            ours.ring_bytes,
            theirs.ring_bytes,
        ),
        (
            "status table slots",
            u64::from(ours.table_slots),
            u64::from(theirs.table_slots),
        ),
        (
            "largest write (bytes)",
            u64::from(ours.payload_bytes_max),
            u64::from(theirs.payload_bytes_max),
        ),
    ];
    fields
        .iter()
        .find(|(_, a, b)| a != b)
        .map(|(name, a, b)| format!("{name} differs: {a} here, {b} on the peer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> NodeInfo {
        NodeInfo {
            geometry: Some(Geometry {
                volume_bytes: 1 << 20,
                sector_bytes: 512,
                ring_bytes: 1 << 16,
                table_slots: 64,
                payload_bytes_max: 4096,
            }),
            epoch: 3,
        }
    }

    /// Runs the server's half of the exchange in memory against a client's steps.
    fn exchange(client_psk: &[u8], server_psk: &[u8]) -> Result<Grant, ControlError> {
        let client = ClientSteps::new(client_psk, Role::Primary, Purpose::OrderQp, info());
        let hello = Hello::decode(&client.hello)?;
        assert_eq!(hello.info, info());
        let nonce = crate::random_nonce();
        let server_mac = mac(
            server_psk,
            SERVER_LABEL,
            &[&client.hello, &[STATUS_OK, Role::Dr as u8], &nonce],
        );
        let challenge = encode_challenge(STATUS_OK, Role::Dr, &nonce, &server_mac);
        let proof = client.answer(&challenge)?;
        if !verify_mac(
            server_psk,
            CLIENT_LABEL,
            &[&client.hello, &challenge[..40]],
            &proof,
        ) {
            return Err(ControlError::BadKey);
        }
        decode_verdict(&encode_verdict(&Ok(Grant {
            info: info(),
            descriptors: vec![RegionDescriptor {
                addr: 1 << 20,
                len: 4096,
                rkey: 7,
                access: 1,
            }],
        })))
    }

    #[test]
    fn same_key_authenticates_and_the_grant_round_trips() {
        // Checks the happy path end to end through the encoders.
        let grant = exchange(b"0123456789abcdef", b"0123456789abcdef").unwrap();
        assert_eq!(grant.info, info());
        assert_eq!(grant.descriptors[0].rkey, 7);
    }

    #[test]
    fn a_different_key_fails_on_both_sides() {
        // Checks that the client rejects a server proving another key.
        assert_eq!(
            exchange(b"0123456789abcdef", b"fedcba9876543210").unwrap_err(),
            ControlError::BadKey
        );
    }

    #[test]
    fn refusals_carry_their_reason_and_garbage_is_named() {
        // Checks the refusal path and that bad magic, versions and roles are told apart.
        let refused = decode_verdict(&encode_verdict(&Err("volume size differs".into())));
        assert_eq!(
            refused.unwrap_err(),
            ControlError::Refused("volume size differs".into())
        );
        // A server that has failed over says so, with its epoch: the client stops retrying.
        let failed_over = Refusal {
            why: "the DR has failed over".into(),
            fenced_at: Some(7),
        };
        let mut verdict = encode_verdict(&Err(failed_over));
        assert_eq!(
            decode_verdict(&verdict).unwrap_err(),
            ControlError::Fenced {
                epoch: 7,
                why: "the DR has failed over".into()
            }
        );
        verdict[5] = 2;
        assert_eq!(
            decode_verdict(&verdict).unwrap_err(),
            ControlError::Malformed("refusal kind 2".into())
        );
        let mut hello =
            ClientSteps::new(b"0123456789abcdef", Role::Dr, Purpose::AuxWatch, info()).hello;
        hello[6] = 9;
        assert!(matches!(
            Hello::decode(&hello),
            Err(ControlError::Malformed(_))
        ));
        hello[4..6].copy_from_slice(&(CONTROL_VERSION + 1).to_le_bytes());
        assert!(matches!(
            Hello::decode(&hello),
            Err(ControlError::Version { theirs, .. }) if theirs == CONTROL_VERSION + 1
        ));
        hello[0] = b'X';
        assert_eq!(Hello::decode(&hello).unwrap_err(), ControlError::NotOrdinal);
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        // Checks that 20,000 random hellos and verdicts decode to a value or an error.
        for _ in 0..20_000 {
            let mut hello = [0u8; HELLO_BYTES];
            let mut verdict = [0u8; VERDICT_BYTES];
            crate::fill_random(&mut hello);
            crate::fill_random(&mut verdict);
            hello[0..4].copy_from_slice(&HELLO_MAGIC);
            verdict[0..4].copy_from_slice(&HELLO_MAGIC);
            let _ = Hello::decode(&hello);
            let _ = decode_verdict(&verdict);
        }
    }

    #[test]
    fn geometry_differences_are_named() {
        // Checks that a volume size mismatch names the field and both values.
        let ours = info().geometry.unwrap();
        let mut theirs = ours;
        theirs.volume_bytes *= 2;
        let text = geometry_mismatch(&ours, &theirs).unwrap();
        assert!(text.contains("volume size"), "{text}");
        assert!(geometry_mismatch(&ours, &ours).is_none());
    }
}
