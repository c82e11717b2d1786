//! Phone file names. Phones and firmware ask for the same file with different letter case, with
//! a leading `/` or with `\` separators (domain.md): every front end maps a requested name to one
//! canonical key here, and rejects names that try to escape the served tree.

use thiserror::Error;

/// Longest name we accept, in bytes (TFTP names are short; this bounds memory and path length).
pub const MAX_NAME_LEN: usize = 255;

/// Why a requested name was refused. Front ends answer these with TFTP ERROR 2 / HTTP 403.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("empty file name")]
    Empty,
    #[error("file name longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("file name contains a NUL or control character")]
    BadChar,
    #[error("file name escapes the served directory")]
    Escape,
}

/// A validated request name: `display` keeps the client's spelling (with `/` separators and no
/// leading slash), `key` is the case-folded lookup key.
///
/// Folding is ASCII-only: phone file names are ASCII, and Unicode folding made distinct names
/// collide (`\u{212A}ern.sbn`, with a KELVIN SIGN, folded onto `kern.sbn`, so a "not found" for
/// the variant blanked out the real file, issue 11). A non-ASCII name is passed through: served
/// if a file has exactly that spelling (or differs from it only in ASCII letter case), never
/// the same key as an ASCII name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileName {
    display: String,
    key: String,
}

impl FileName {
    /// Normalizes a name as phones send it: strips leading `/`, turns `\` into `/`, collapses
    /// `./` and repeated separators, refuses `..`, absolute Windows paths, NUL and over-long names.
    pub fn parse(raw: &str) -> Result<FileName, NameError> {
        if raw.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if raw.chars().any(|c| c == '\0' || c.is_control()) {
            return Err(NameError::BadChar);
        }
        let unified = raw.replace('\\', "/");
        let mut parts = Vec::new();
        for part in unified.split('/') {
            match part {
                "" | "." => continue,
                ".." => return Err(NameError::Escape),
                // `C:/...` or `C:foo` is an absolute Windows path, never a phone file, in any
                // segment (`./C:/x` too): a Windows-backed upstream or export would follow it.
                p if is_drive(p) => return Err(NameError::Escape),
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err(NameError::Empty);
        }
        let display = parts.join("/");
        let key = display.to_ascii_lowercase();
        Ok(FileName { display, key })
    }

    /// The name as the client spelled it, normalized (`/` separators, no leading slash).
    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// The case-folded key used for every lookup.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// `C:` or `C:anything`: a Windows drive.
fn is_drive(part: &str) -> bool {
    let b = part.as_bytes();
    b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic()
}

impl std::fmt::Display for FileName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_spellings_share_one_key() {
        let a = FileName::parse("/RINGLIST.XML").unwrap();
        let b = FileName::parse("Ringlist.xml").unwrap();
        assert_eq!(a.key(), b.key());
        assert_eq!(a.as_str(), "RINGLIST.XML");
        let c = FileName::parse("\\English_United_States\\mk-sip.jar").unwrap();
        assert_eq!(c.as_str(), "English_United_States/mk-sip.jar");
    }

    #[test]
    fn case_folding_is_ascii_only() {
        let kelvin = FileName::parse("\u{212A}ern.sbn").unwrap();
        let plain = FileName::parse("kern.sbn").unwrap();
        assert_ne!(kelvin.key(), plain.key());
        assert_eq!(kelvin.key(), "\u{212A}ern.sbn");
        assert_eq!(FileName::parse("KERN.SBN").unwrap().key(), plain.key());
    }

    #[test]
    fn escapes_are_refused() {
        for bad in [
            "../../etc/passwd",
            "a/../../b",
            "..",
            "C:\\boot.ini",
            "c:foo",
            "/C:/Windows/win.ini",
            "//c:\\boot.ini",
            "./C:/x",
            "a/c:/b",
            "locale\\D:evil",
        ] {
            assert_eq!(FileName::parse(bad), Err(NameError::Escape), "{bad}");
        }
        assert_eq!(FileName::parse("a\0b"), Err(NameError::BadChar));
        assert_eq!(FileName::parse(&"a".repeat(256)), Err(NameError::TooLong));
        assert_eq!(FileName::parse("/"), Err(NameError::Empty));
    }
}
