//! The node's WireGuard key pair. Made on the first start and kept in the
//! state folder as `wg genkey` writes keys (base64, one line), in a file
//! only its owner can read; replaced whole on rotation. The private half
//! goes to the WireGuard device and nowhere else: it has no `Debug`, no
//! `Display`, and no error message quotes it.
//!
//! The node's signing key ([`super::signing`]) is kept the same way, by the
//! same functions.

use std::{
    fmt, fs,
    io::{self, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
};

use base64::Engine as _;
use curve25519_dalek::MontgomeryPoint;
use zeroize::Zeroizing;

/// The private key's name in the state folder.
pub const KEY_FILE: &str = "wireguard.key";

const KEY_LEN: usize = 32;

/// A WireGuard (X25519) public key, shown in base64 as `wg` shows it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

/// The node's key pair.
pub struct NodeKey {
    private: Zeroizing<[u8; KEY_LEN]>,
    public: PublicKey,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeKeyError {
    #[error("cannot get random bytes from the system: {0}")]
    Random(getrandom::Error),
    #[error("{}: cannot {what}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a private key (one line of base64, 32 bytes)", .0.display())]
    Invalid(PathBuf),
    #[error(
        "{}: readable by others (mode {mode:o}); a private key must be mode 0600 \
         (remove the file to make a new key)", path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a WireGuard public key (32 bytes of base64)")]
pub struct InvalidPublicKey(String);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Lower-case hex, as the cross-platform UAPI writes keys.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublicKey {
    type Err = InvalidPublicKey;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes: [u8; KEY_LEN] = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| InvalidPublicKey(text.to_owned()))?;
        // The all-zero key is X25519's identity: no peer can hold it.
        if bytes == [0; KEY_LEN] {
            return Err(InvalidPublicKey(text.to_owned()));
        }
        Ok(Self(bytes))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl NodeKey {
    /// A new random key pair.
    pub fn generate() -> Result<Self, NodeKeyError> {
        let mut private = Zeroizing::new([0; KEY_LEN]);
        getrandom::fill(private.as_mut()).map_err(NodeKeyError::Random)?;
        Ok(Self::from_private(private))
    }

    /// The key in `dir`, or a new one saved there if there is none.
    /// `true` with a new key.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), NodeKeyError> {
        let (private, created) =
            load_or_create_secret(dir, KEY_FILE, || Ok(Self::generate()?.private))?;
        Ok((Self::from_private(private), created))
    }

    /// Reads a private key, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, NodeKeyError> {
        Ok(Self::from_private(load_secret(path)?))
    }

    /// Writes the private key to `dir`/[`KEY_FILE`], replacing any key
    /// there at once.
    pub fn save(&self, dir: &Path) -> Result<(), NodeKeyError> {
        save_secret(dir, KEY_FILE, &self.private)
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The private key, for the WireGuard device only.
    pub(crate) fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    fn from_private(mut private: Zeroizing<[u8; KEY_LEN]>) -> Self {
        // Clamped as `wg genkey` does, so the file holds the key in use.
        private[0] &= 248;
        private[31] = (private[31] & 127) | 64;
        let public = PublicKey(MontgomeryPoint::mul_base_clamped(*private).to_bytes());
        Self { private, public }
    }
}

/// The secret in `dir`/`file`, or a new one from `make`, saved there. `true`
/// with a new secret.
pub(super) fn load_or_create_secret(
    dir: &Path,
    file: &str,
    make: impl FnOnce() -> Result<Zeroizing<[u8; KEY_LEN]>, NodeKeyError>,
) -> Result<(Zeroizing<[u8; KEY_LEN]>, bool), NodeKeyError> {
    match load_secret(&dir.join(file)) {
        Err(NodeKeyError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let secret = make()?;
            save_secret(dir, file, &secret)?;
            Ok((secret, true))
        }
        loaded => loaded.map(|secret| (secret, false)),
    }
}

/// Reads a 32-byte secret (one line of base64), refusing a file that others
/// can read.
pub(super) fn load_secret(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, NodeKeyError> {
    let io_error = |what| {
        let path = path.to_owned();
        move |source| NodeKeyError::Io { what, path, source }
    };
    let mode = fs::metadata(path).map_err(io_error("read"))?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(NodeKeyError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io_error("read"))?);
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| NodeKeyError::Invalid(path.to_owned()))?,
    );
    let secret: [u8; KEY_LEN] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| NodeKeyError::Invalid(path.to_owned()))?;
    Ok(Zeroizing::new(secret))
}

/// Writes `secret` to `dir`/`file`, replacing any secret there at once: it
/// is written beside it (mode 0600 from the moment it exists) and renamed
/// over it.
pub(super) fn save_secret(
    dir: &Path,
    file: &str,
    secret: &[u8; KEY_LEN],
) -> Result<(), NodeKeyError> {
    let path = dir.join(file);
    let fresh = dir.join(format!(".{file}.new"));
    let io_error = |what, path: &Path| {
        let path = path.to_owned();
        move |source| NodeKeyError::Io { what, path, source }
    };
    // A leftover of a crash mid-save holds no key anyone uses.
    let _ = fs::remove_file(&fresh);
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&fresh)
        .map_err(io_error("create", &fresh))?;
    let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(secret) + "\n");
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(io_error("write", &fresh))?;
    fs::rename(&fresh, &path).map_err(io_error("replace", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (key, created) = NodeKey::load_or_create(dir.path()).unwrap();
        assert!(created);
        let path = dir.path().join(KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let (again, created) = NodeKey::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(again.public(), key.public());
    }

    #[test]
    fn public_key_matches_wireguard() {
        // A pair made by `wg genkey | tee /dev/stderr | wg pubkey`.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, "CAtK07ATMlSmn5bk/qIcYbtXG2xFvrHtyvfqsLNiGEU=\n").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let key = NodeKey::load(&path).unwrap();
        assert_eq!(
            key.public().to_string(),
            "uqVCjAMVCszUNU1UBYcCEL44uWuHQ3FD2PsxuToqyik="
        );
    }

    #[test]
    fn refuses_a_key_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _) = NodeKey::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert!(matches!(
            NodeKey::load(&path),
            Err(NodeKeyError::Exposed { mode: 0o644, .. })
        ));
    }

    #[test]
    fn public_keys_parse_strictly() {
        let key = NodeKey::generate().unwrap().public();
        assert_eq!(key.to_string().parse::<PublicKey>(), Ok(key));
        for bad in ["", "AAAA", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
    }
}
