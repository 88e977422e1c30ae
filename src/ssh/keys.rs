//! Private-key decoding that accepts every ECDSA key `ssh-keygen` writes.
//!
//! OpenSSH stores an ECDSA private scalar as an SSH `mpint` (RFC 4251 § 5): big-endian, leading
//! zero bytes dropped, one `0x00` put back in front when the top bit is set. `ssh-key` (the
//! decoder under russh, 0.7.0-rc) accepts a scalar of the curve's full width (with that `0x00`),
//! or one shortened down to 32 bytes, and nothing shorter. So a P-256 scalar whose top byte is 0
//! and whose next byte is below 0x80 — stored in 31 bytes or fewer — is refused with a length
//! error: about one key in 512 that `ssh-keygen -t ecdsa` makes fails at random with
//! `SecretInvalid`. (Top byte 0 with the next byte ≥ 0x80 is stored as `00` + 31 bytes = 32 bytes
//! and happens to read fine.) P-384 and P-521 scalars are 48 and 66 bytes wide and would have to
//! lose 16 or more leading zero bytes to go under 32, which never happens in practice; the repair
//! below handles every curve all the same.
//!
//! Re-saving the key with `ssh-keygen -p` does not help: OpenSSH writes the short form again.
//! Converting it to PEM (`ssh-keygen -p -m PEM`) does: SEC1 stores the scalar at full width.
//!
//! [`decode_private_key`] lets russh decode first. Only when that fails on an OpenSSH-format
//! ECDSA key whose scalar is shorter than its curve's width does it rewrite the scalar at full
//! width (exactly as `ssh-key` itself writes it), re-pad the private section and decode again.
//! An encrypted key is decrypted here first, with `ssh-key`'s own KDF and ciphers, and the
//! repaired key comes back decrypted, in memory only, as russh's own decoding returns it.
//!
//! PEM keys need none of this: SEC1 and PKCS#8 store the scalar at full width (OpenSSL pads it)
//! and russh reads a short one too. A passphrase-protected PEM EC key is another matter (russh
//! cannot read any), and gets an error that says how to convert it.

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::cipher::Tag;

use super::Error;

const OPENSSH_BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
const OPENSSH_END: &str = "-----END OPENSSH PRIVATE KEY-----";
/// First bytes of every `openssh-key-v1` blob (OpenSSH PROTOCOL.key).
const AUTH_MAGIC: &[u8] = b"openssh-key-v1\0";
/// The private section of an unencrypted key is padded to this (the block size of cipher "none").
const NONE_BLOCK_SIZE: usize = 8;

/// Decodes an OpenSSH, PEM (SEC1, PKCS#1, PKCS#8) or PuTTY private key, decrypting it with
/// `passphrase` when it is encrypted.
///
/// Unlike `russh::keys::decode_secret_key` alone, this reads the OpenSSH-format ECDSA keys
/// whose private scalar `ssh-keygen` stored shortened (see the module docs): about one P-256 key
/// in 512. Every other key, and every other failure, is exactly what russh makes of it.
pub fn decode_private_key(text: &str, passphrase: Option<&str>) -> Result<PrivateKey, Error> {
    let first = match russh::keys::decode_secret_key(text, passphrase) {
        Ok(key) => return Ok(key),
        Err(e) => e,
    };
    if passphrase.is_none() && matches!(first, russh::keys::Error::KeyIsEncrypted) {
        return Err(Error::BadKey(
            "it is encrypted and no passphrase was given".to_string(),
        ));
    }
    if is_encrypted_sec1_pem(text) {
        return Err(Error::BadKey(
            "it is a passphrase-protected PEM EC key (BEGIN EC PRIVATE KEY, Proc-Type: \
             4,ENCRYPTED), which the SSH library cannot decrypt (it decrypts only RSA keys in this \
             legacy format); convert it to the OpenSSH format, keeping the passphrase, with \
             `ssh-keygen -p -f KEY`, or remove the passphrase with `ssh-keygen -p -N '' -m PEM -f KEY`"
                .to_string(),
        ));
    }
    match repair_short_ecdsa_scalar(text, passphrase) {
        Repair::NotApplicable => Err(Error::BadKey(first.to_string())),
        Repair::Repaired { key, curve } => {
            tracing::debug!(
                curve = curve.label,
                "read an OpenSSH ECDSA key whose private scalar ssh-keygen stored shortened"
            );
            Ok(*key)
        }
        Repair::StillUnreadable { curve, reason } => Err(Error::BadKey(format!(
            "this {} key's private scalar starts with a zero byte, which ssh-keygen stores \
             shortened and the SSH library cannot read ({first}); writing it at full width did \
             not help either ({reason}). Convert the key to PEM with `ssh-keygen -p -m PEM -f KEY` \
             (re-saving it in the OpenSSH format does not help) or generate a new key",
            curve.label
        ))),
    }
}

/// A legacy OpenSSL-encrypted SEC1 key (`ssh-keygen -t ecdsa -m PEM -N …`). russh decrypts this
/// format but then parses the plaintext as an RSA (PKCS#1) key, so every such EC key fails with
/// an ASN.1 error that does not say what is wrong; the scalar width plays no part in it.
/// Decrypting it here would take MD5 (OpenSSL's `EVP_BytesToKey`), which no dependency offers.
fn is_encrypted_sec1_pem(text: &str) -> bool {
    let mut lines = text.lines().map(str::trim);
    lines.any(|l| l == "-----BEGIN EC PRIVATE KEY-----")
        && lines
            .take_while(|l| !l.starts_with("-----END "))
            .any(|l| l.starts_with("Proc-Type:") && l.contains("ENCRYPTED"))
}

/// What [`repair_short_ecdsa_scalar`] made of a key russh refused.
enum Repair {
    /// Not an OpenSSH ECDSA key with a shortened scalar (or it cannot be decrypted with the
    /// passphrase given): russh's error stands.
    NotApplicable,
    Repaired {
        key: Box<PrivateKey>,
        curve: Curve,
    },
    /// It has a shortened scalar, and `ssh-key` refuses it even written at full width.
    StillUnreadable {
        curve: Curve,
        reason: String,
    },
}

fn repair_short_ecdsa_scalar(text: &str, passphrase: Option<&str>) -> Repair {
    let Some(blob) = openssh_blob(text) else {
        return Repair::NotApplicable;
    };
    let Some(container) = Container::parse(&blob) else {
        return Repair::NotApplicable;
    };
    // before decrypting: a wrong passphrase for any other key must not cost a second KDF run
    if Reader(container.public_key)
        .string()
        .and_then(Curve::of_key_type)
        .is_none()
    {
        return Repair::NotApplicable;
    }
    let plain = if container.cipher == b"none" {
        Secret(container.private.to_vec())
    } else {
        let Some(passphrase) = passphrase else {
            return Repair::NotApplicable;
        };
        match decrypt_private_section(&blob, &container, passphrase) {
            Some(plain) => plain,
            None => return Repair::NotApplicable,
        }
    };
    let Some((curve, section)) = widen_scalar_in_private_section(&plain.0) else {
        return Repair::NotApplicable;
    };
    let Some(repaired) = encode_unencrypted_container(container.public_key, &section.0) else {
        return Repair::NotApplicable;
    };
    match PrivateKey::from_bytes(&repaired.0) {
        Ok(key) => Repair::Repaired {
            key: Box::new(key),
            curve,
        },
        Err(e) => Repair::StillUnreadable {
            curve,
            reason: e.to_string(),
        },
    }
}

/// Key material that is overwritten with zeros when dropped (its whole capacity, with
/// writes the optimizer may not remove: `zeroize`).
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// The binary `openssh-key-v1` blob inside `-----BEGIN OPENSSH PRIVATE KEY-----` armour.
fn openssh_blob(text: &str) -> Option<Secret> {
    let mut lines = text.lines().map(str::trim);
    lines.find(|l| *l == OPENSSH_BEGIN)?;
    let mut base64_text = Secret(Vec::new());
    for line in lines {
        if line == OPENSSH_END {
            let engine = GeneralPurpose::new(
                &alphabet::STANDARD,
                GeneralPurposeConfig::new()
                    .with_decode_padding_mode(DecodePaddingMode::Indifferent),
            );
            return engine.decode(&base64_text.0).ok().map(Secret);
        }
        base64_text
            .0
            .extend(line.bytes().filter(|b| !b.is_ascii_whitespace()));
    }
    None
}

/// The outer structure of an `openssh-key-v1` blob holding one key, borrowed from the blob:
///
/// ```text
/// "openssh-key-v1\0" string ciphername, string kdfname, string kdfoptions, uint32 N (= 1),
/// string publickey, string private section, [16-byte tag for AEAD ciphers]
/// ```
struct Container<'a> {
    cipher: &'a [u8],
    public_key: &'a [u8],
    /// The private section: plain for cipher "none", else encrypted.
    private: &'a [u8],
    /// What follows the private section: the authentication tag of an AEAD cipher, else empty.
    trailer: &'a [u8],
}

impl<'a> Container<'a> {
    fn parse(blob: &'a Secret) -> Option<Self> {
        let mut r = Reader(blob.0.strip_prefix(AUTH_MAGIC)?);
        let cipher = r.string()?;
        let _kdf_name = r.string()?;
        let _kdf_options = r.string()?;
        if r.u32()? != 1 {
            return None;
        }
        let public_key = r.string()?;
        let private = r.string()?;
        Some(Self {
            cipher,
            public_key,
            private,
            trailer: r.0,
        })
    }
}

/// Decrypts the private section with `ssh-key`'s KDF and cipher (the ones its own `decrypt`
/// uses, which then refuses a shortened scalar all the same). `None` when the cipher or KDF is
/// not supported or the passphrase is wrong (an AEAD tag that does not verify; for the other
/// ciphers the check integers that do not match tell, see [`widen_scalar_in_private_section`]).
fn decrypt_private_section(
    blob: &Secret,
    container: &Container<'_>,
    passphrase: &str,
) -> Option<Secret> {
    let encrypted = PrivateKey::from_bytes(&blob.0).ok()?;
    if !encrypted.is_encrypted() {
        return None;
    }
    let cipher = encrypted.cipher();
    let (key, iv) = encrypted.kdf().derive_key_and_iv(cipher, passphrase).ok()?;
    let tag = if cipher.has_tag() {
        Some(Tag::try_from(container.trailer).ok()?)
    } else {
        None
    };
    let mut plain = Secret(container.private.to_vec());
    cipher.decrypt(&key, &iv, &mut plain.0, tag).ok()?;
    Some(plain)
}

/// An ECDSA curve as `ssh-keygen` names it in the key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Curve {
    label: &'static str,
    /// Width of the private scalar in bytes.
    scalar_len: usize,
}

impl Curve {
    fn of_key_type(key_type: &[u8]) -> Option<Self> {
        let (label, scalar_len) = match key_type {
            b"ecdsa-sha2-nistp256" => ("P-256", 32),
            b"ecdsa-sha2-nistp384" => ("P-384", 48),
            b"ecdsa-sha2-nistp521" => ("P-521", 66),
            _ => return None,
        };
        Some(Self { label, scalar_len })
    }
}

/// Rewrites a decrypted private section holding one ECDSA key with its scalar at full width,
/// padded anew for cipher "none":
///
/// ```text
/// uint32 checkint, uint32 checkint, string keytype, string curve, string public point,
/// mpint private scalar, string comment, padding 1, 2, 3, …
/// ```
///
/// `None` when there is nothing this can fix: another key type, check integers that differ
/// (a wrong passphrase), a malformed section, or a scalar already written the way `ssh-key`
/// writes it.
fn widen_scalar_in_private_section(plain: &[u8]) -> Option<(Curve, Secret)> {
    let mut r = Reader(plain);
    let check1 = r.u32()?;
    let check2 = r.u32()?;
    if check1 != check2 {
        return None;
    }
    let key_type = r.string()?;
    let curve = Curve::of_key_type(key_type)?;
    let curve_name = r.string()?;
    let point = r.string()?;
    let scalar = r.string()?;
    let comment = r.string()?;
    // the rest is padding, recomputed below
    let widened = widen_mpint(scalar, curve.scalar_len)?;
    if widened.0 == scalar {
        return None;
    }
    let mut out = Secret(Vec::with_capacity(plain.len() + curve.scalar_len));
    out.0.extend_from_slice(&check1.to_be_bytes());
    out.0.extend_from_slice(&check2.to_be_bytes());
    for field in [key_type, curve_name, point, &widened.0, comment] {
        put_string(&mut out.0, field)?;
    }
    let padding = (NONE_BLOCK_SIZE - out.0.len() % NONE_BLOCK_SIZE) % NONE_BLOCK_SIZE;
    out.0.extend((1u8..).take(padding));
    Some((curve, out))
}

/// The body of `mpint` (a non-negative scalar) left-padded with zeros to `width` bytes, with
/// the `0x00` sign byte in front when the top bit is then set: what `ssh-key` writes and reads
/// back. `None` for a negative mpint or one wider than `width`.
fn widen_mpint(mpint: &[u8], width: usize) -> Option<Secret> {
    if mpint.first().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    let magnitude = &mpint[mpint.iter().take_while(|b| **b == 0).count()..];
    let zeros = width.checked_sub(magnitude.len())?;
    let mut out = Secret(Vec::with_capacity(width + 1));
    out.0.resize(zeros, 0);
    out.0.extend_from_slice(magnitude);
    if out.0.first().is_some_and(|b| b & 0x80 != 0) {
        out.0.insert(0, 0);
    }
    Some(out)
}

/// An unencrypted `openssh-key-v1` blob (cipher and KDF "none") around `private_section`.
fn encode_unencrypted_container(public_key: &[u8], private_section: &[u8]) -> Option<Secret> {
    let mut out = Secret(Vec::with_capacity(
        AUTH_MAGIC.len() + 40 + public_key.len() + private_section.len(),
    ));
    out.0.extend_from_slice(AUTH_MAGIC);
    put_string(&mut out.0, b"none")?;
    put_string(&mut out.0, b"none")?;
    put_string(&mut out.0, b"")?;
    out.0.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut out.0, public_key)?;
    put_string(&mut out.0, private_section)?;
    Some(out)
}

/// Appends an SSH `string`: a big-endian u32 length, then the bytes.
fn put_string(out: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
    out.extend_from_slice(&u32::try_from(bytes.len()).ok()?.to_be_bytes());
    out.extend_from_slice(bytes);
    Some(())
}

/// Reads SSH wire types (RFC 4251 § 5) off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::HashAlg;
    use russh::keys::ssh_key::{Cipher, Kdf};

    /// The generator of each curve (uncompressed SEC1): the public key of private scalar 1,
    /// whose mpint is a single byte, as short as a scalar gets.
    const P256_G: &str = "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296\
                          4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";
    const P384_G: &str = "04aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a38\
                          5502f25dbf55296c3a545e3872760ab7\
                          3617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c0\
                          0a60b1ce1d7e819d7a431d7c90ea0e5f";
    const P521_G: &str = "0400c6858e06b70404e9cd9e3ecb662395b4429c648139053fb521f828af606b4d\
                          3dbaa14b5e77efe75928fe1dc127a2ffa8de3348b3c1856a429bf97e7e31c2e5bd66\
                          011839296a789a3bc0045c8a5fb42c7d1bd998f54449579b446817afbd17273e66\
                          2c97ee72995ef42640c550b9013fad0761353c7086a272c24088be94769fd16650";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn string(out: &mut Vec<u8>, bytes: &[u8]) {
        put_string(out, bytes).expect("put_string");
    }

    struct TestKey {
        key_type: &'static str,
        curve_name: &'static str,
        point: Vec<u8>,
    }

    fn curves() -> [TestKey; 3] {
        [
            TestKey {
                key_type: "ecdsa-sha2-nistp256",
                curve_name: "nistp256",
                point: hex(P256_G),
            },
            TestKey {
                key_type: "ecdsa-sha2-nistp384",
                curve_name: "nistp384",
                point: hex(P384_G),
            },
            TestKey {
                key_type: "ecdsa-sha2-nistp521",
                curve_name: "nistp521",
                point: hex(P521_G),
            },
        ]
    }

    fn public_blob(k: &TestKey) -> Vec<u8> {
        let mut out = Vec::new();
        string(&mut out, k.key_type.as_bytes());
        string(&mut out, k.curve_name.as_bytes());
        string(&mut out, &k.point);
        out
    }

    /// A private section as OpenSSH writes it: `scalar_mpint` as given, padded to `block`.
    fn private_section(k: &TestKey, scalar_mpint: &[u8], comment: &str, block: usize) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        out.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        string(&mut out, k.key_type.as_bytes());
        string(&mut out, k.curve_name.as_bytes());
        string(&mut out, &k.point);
        string(&mut out, scalar_mpint);
        string(&mut out, comment.as_bytes());
        let mut pad = 1u8;
        while out.len() % block != 0 {
            out.push(pad);
            pad += 1;
        }
        out
    }

    fn armour(blob: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
        let mut text = format!("{OPENSSH_BEGIN}\n");
        for chunk in b64.as_bytes().chunks(70) {
            text.push_str(std::str::from_utf8(chunk).expect("ascii"));
            text.push('\n');
        }
        text.push_str(OPENSSH_END);
        text.push('\n');
        text
    }

    /// An encrypted blob the way `ssh-keygen -N` writes one (bcrypt KDF, few rounds for speed).
    fn encrypted_blob(k: &TestKey, scalar_mpint: &[u8], cipher: Cipher, pass: &str) -> Vec<u8> {
        let salt = b"0123456789abcdef".to_vec();
        let kdf = Kdf::Bcrypt {
            salt: salt.clone(),
            rounds: 2,
        };
        let (key, iv) = kdf.derive_key_and_iv(cipher, pass).expect("kdf");
        let mut private = private_section(k, scalar_mpint, "enc", cipher.block_size());
        let tag = cipher.encrypt(&key, &iv, &mut private).expect("encrypt");
        let mut blob = AUTH_MAGIC.to_vec();
        string(&mut blob, cipher.as_str().as_bytes());
        string(&mut blob, b"bcrypt");
        let mut options = Vec::new();
        string(&mut options, &salt);
        options.extend_from_slice(&2u32.to_be_bytes());
        string(&mut blob, &options);
        blob.extend_from_slice(&1u32.to_be_bytes());
        string(&mut blob, &public_blob(k));
        string(&mut blob, &private);
        if let Some(tag) = tag {
            blob.extend_from_slice(&tag);
        }
        blob
    }

    fn unencrypted_blob(k: &TestKey, scalar_mpint: &[u8], comment: &str) -> Vec<u8> {
        let private = private_section(k, scalar_mpint, comment, NONE_BLOCK_SIZE);
        let mut blob = AUTH_MAGIC.to_vec();
        string(&mut blob, b"none");
        string(&mut blob, b"none");
        string(&mut blob, b"");
        blob.extend_from_slice(&1u32.to_be_bytes());
        string(&mut blob, &public_blob(k));
        string(&mut blob, &private);
        blob
    }

    /// Scalar 1 is the key of public point G: a signature made with the decoded key verifies
    /// against G only when the scalar was read back as exactly 1.
    fn assert_is_scalar_one_of(key: &PrivateKey, k: &TestKey) {
        let ecdsa = key.key_data().ecdsa().expect("ecdsa key");
        let private = ecdsa.private_key_bytes();
        assert_eq!(private.last(), Some(&1), "{}", k.key_type);
        assert!(
            private[..private.len() - 1].iter().all(|b| *b == 0),
            "{}",
            k.key_type
        );
        assert_eq!(ecdsa.public_key_bytes(), &k.point[..]);
        let signature = key
            .sign("outrider-test", HashAlg::Sha256, b"message")
            .expect("sign");
        key.public_key()
            .verify("outrider-test", b"message", &signature)
            .expect("signature of the decoded key verifies against G");
    }

    #[test]
    fn short_scalars_are_widened_to_the_curve_width_the_way_ssh_key_writes_them() {
        let w = |m: &[u8], width| widen_mpint(m, width).map(|s| s.0.clone());
        let mut one = vec![0u8; 31];
        one.push(1);
        assert_eq!(w(&[1], 32), Some(one.clone()));
        // a redundant leading zero is dropped like any other
        assert_eq!(w(&[0, 0, 1], 32), Some(one));
        // 31 bytes, top bit clear: padded to 32, no sign byte
        let mut short = vec![0x7fu8; 31];
        let mut widened = vec![0u8];
        widened.append(&mut short.clone());
        assert_eq!(w(&short, 32), Some(widened));
        // "00 8x…" (32 bytes) is already the full-width form, and so is "00 ff…" (33 bytes)
        short[0] = 0x80;
        let mut signed = vec![0u8];
        signed.append(&mut short);
        assert_eq!(w(&signed, 32), Some(signed.clone()));
        let mut full = vec![0u8];
        full.extend(vec![0xffu8; 32]);
        assert_eq!(w(&full, 32), Some(full.clone()));
        // P-521: 65 bytes become 66, a top byte of 1 needs no sign byte
        let p521 = vec![0x01u8; 65];
        let mut p521_wide = vec![0u8];
        p521_wide.extend(&p521);
        assert_eq!(w(&p521, 66), Some(p521_wide));
        // negative, or wider than the curve: not a scalar this can fix
        assert_eq!(w(&[0x80], 32), None);
        assert_eq!(w(&[1u8; 33], 32), None);
    }

    #[test]
    fn a_private_section_with_a_short_scalar_round_trips_through_ssh_key() {
        for k in curves() {
            let blob = unencrypted_blob(&k, &[1], "a comment");
            let text = armour(&blob);
            // the library alone refuses it: a 1-byte mpint is under its 32-byte minimum
            assert!(
                russh::keys::decode_secret_key(&text, None).is_err(),
                "{}: russh should refuse the short scalar",
                k.key_type
            );
            let key = decode_private_key(&text, None).expect("repaired key decodes");
            assert_is_scalar_one_of(&key, &k);
            assert_eq!(key.comment().as_bytes(), b"a comment");

            // what we re-encoded is byte for byte what ssh-key writes for the same key
            let container_blob = Secret(blob.clone());
            let container = Container::parse(&container_blob).expect("container");
            let (curve, section) =
                widen_scalar_in_private_section(container.private).expect("widened");
            assert_eq!(
                curve,
                Curve::of_key_type(k.key_type.as_bytes()).expect("curve")
            );
            assert_eq!(section.0.len() % NONE_BLOCK_SIZE, 0);
            let repaired =
                encode_unencrypted_container(container.public_key, &section.0).expect("encode");
            assert_eq!(
                &key.to_bytes().expect("ssh-key encodes")[..],
                &repaired.0[..],
                "{}",
                k.key_type
            );
            // and once widened there is nothing left to fix
            let again = Secret(repaired.0.clone());
            let again = Container::parse(&again).expect("container");
            assert!(widen_scalar_in_private_section(again.private).is_none());
        }
    }

    #[test]
    fn a_scalar_already_at_full_width_is_left_alone() {
        let k = &curves()[0];
        let mut scalar = vec![0x11u8; 32];
        scalar[31] = 0x22;
        let plain = private_section(k, &scalar, "", NONE_BLOCK_SIZE);
        assert!(widen_scalar_in_private_section(&plain).is_none());
    }

    #[test]
    fn encrypted_keys_with_a_short_scalar_decrypt_and_decode() {
        for cipher in [
            Cipher::Aes256Ctr,
            Cipher::ChaCha20Poly1305,
            Cipher::Aes256Gcm,
        ] {
            for k in curves() {
                let text = armour(&encrypted_blob(&k, &[1], cipher, "secret"));
                assert!(russh::keys::decode_secret_key(&text, Some("secret")).is_err());
                let key = decode_private_key(&text, Some("secret"))
                    .unwrap_or_else(|e| panic!("{cipher:?} {}: {e}", k.key_type));
                assert!(!key.is_encrypted());
                assert_is_scalar_one_of(&key, &k);
            }
        }
    }

    #[test]
    fn a_wrong_passphrase_keeps_the_library_error() {
        let k = &curves()[0];
        for cipher in [Cipher::Aes256Ctr, Cipher::ChaCha20Poly1305] {
            let text = armour(&encrypted_blob(k, &[1], cipher, "secret"));
            let expected = russh::keys::decode_secret_key(&text, Some("wrong"))
                .expect_err("wrong passphrase")
                .to_string();
            let err = decode_private_key(&text, Some("wrong")).expect_err("wrong passphrase");
            assert_eq!(
                err.to_string(),
                format!("the private key cannot be used: {expected}")
            );
        }
    }

    #[test]
    fn an_encrypted_key_without_a_passphrase_says_so() {
        let k = &curves()[0];
        let text = armour(&encrypted_blob(k, &[1], Cipher::Aes256Ctr, "secret"));
        let err = decode_private_key(&text, None).expect_err("needs a passphrase");
        assert_eq!(
            err.to_string(),
            "the private key cannot be used: it is encrypted and no passphrase was given"
        );
    }

    #[test]
    fn other_failures_keep_the_library_error() {
        for text in [
            "not a key".to_string(),
            format!("{OPENSSH_BEGIN}\nAAAA\n{OPENSSH_END}\n"),
        ] {
            let expected = russh::keys::decode_secret_key(&text, None)
                .expect_err("not a key")
                .to_string();
            let err = decode_private_key(&text, None).expect_err("not a key");
            assert_eq!(
                err.to_string(),
                format!("the private key cannot be used: {expected}")
            );
        }
    }

    #[test]
    fn a_short_scalar_key_that_still_cannot_be_read_says_what_to_do() {
        // a short scalar, but a public point ssh-key refuses: widening is not enough
        let k = TestKey {
            key_type: "ecdsa-sha2-nistp256",
            curve_name: "nistp256",
            point: vec![0x04; 7],
        };
        let text = armour(&unencrypted_blob(&k, &[1], ""));
        let err = decode_private_key(&text, None).expect_err("unreadable");
        let msg = err.to_string();
        assert!(
            msg.contains("P-256 key's private scalar starts with a zero byte"),
            "{msg}"
        );
        assert!(msg.contains("ssh-keygen -p -m PEM -f KEY"), "{msg}");
        assert_eq!(err.reason(), "SecretInvalid");
    }

    #[test]
    fn a_passphrase_protected_pem_ec_key_says_how_to_convert_it() {
        let text = "-----BEGIN EC PRIVATE KEY-----\n\
                    Proc-Type: 4,ENCRYPTED\n\
                    DEK-Info: AES-128-CBC,E1B6B1C25C4DE38B758385996A245FBD\n\
                    \n\
                    AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n\
                    -----END EC PRIVATE KEY-----\n";
        let err = decode_private_key(text, Some("passphrase")).expect_err("cannot decrypt");
        assert!(err.to_string().contains("`ssh-keygen -p -f KEY`"), "{err}");
        let err = decode_private_key(text, None).expect_err("no passphrase");
        assert!(
            err.to_string().ends_with("no passphrase was given"),
            "{err}"
        );
    }

    #[test]
    fn crlf_armour_is_read() {
        let k = &curves()[1];
        let text = armour(&unencrypted_blob(k, &[1], "")).replace('\n', "\r\n");
        let key = decode_private_key(&text, None).expect("CRLF key");
        assert_is_scalar_one_of(&key, k);
    }
}
