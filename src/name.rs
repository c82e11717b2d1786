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
        // `C:/...` or `C:foo` is an absolute Windows path, never a phone file; also after the
        // leading `/` that every HTTP path (and some TFTP clients) put in front of a name.
        let bytes = unified.trim_start_matches('/').as_bytes();
        if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
            return Err(NameError::Escape);
        }
        let mut parts = Vec::new();
        for part in unified.split('/') {
            match part {
                "" | "." => continue,
                ".." => return Err(NameError::Escape),
                p => parts.push(p),
            }
        }
        if parts.is_empty() {
            return Err(NameError::Empty);
        }
        let display = parts.join("/");
        let key = display.to_lowercase();
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
    fn escapes_are_refused() {
        for bad in [
            "../../etc/passwd",
            "a/../../b",
            "..",
            "C:\\boot.ini",
            "c:foo",
            "/C:/Windows/win.ini",
            "//c:\\boot.ini",
        ] {
            assert_eq!(FileName::parse(bad), Err(NameError::Escape), "{bad}");
        }
        assert_eq!(FileName::parse("a\0b"), Err(NameError::BadChar));
        assert_eq!(FileName::parse(&"a".repeat(256)), Err(NameError::TooLong));
        assert_eq!(FileName::parse("/"), Err(NameError::Empty));
    }
}
