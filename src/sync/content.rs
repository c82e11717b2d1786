//! Content checks before the sync worker replaces a cached trust list or config. An upstream
//! that answers 200 is not always the central server: a captive proxy or a load balancer's
//! error page arrives with a 200 too, and published over `ITLFile.tlv` or a phone's
//! `.cnf.xml` it would break every phone's next boot. So a new version of those files must
//! look like one: a `.tlv` starts with the TLV header records CTL/ITL files open with, a
//! `.xml` parses as XML (one root element, tags balanced), and a `.cnf.xml` has a Cisco
//! config's root (`<device>`, `<Default>`). A rejected update keeps the old version; the
//! caller logs why. Other files (firmware is versioned and never replaced) are not checked.

use std::io::{Read, Write};

use crate::cache::Publisher;

/// Larger "configs" are refused without parsing: real ones are tens of kilobytes.
const MAX_CHECKED: u64 = 8 << 20;

/// Checks the body a publisher holds before it replaces a cached version of its name.
pub fn check_replacement(publisher: &mut Publisher) -> Result<(), String> {
    let name = publisher.name().key().to_string();
    let kind = Kind::of(&name);
    if kind == Kind::Unchecked {
        return Ok(());
    }
    if publisher.written() > MAX_CHECKED {
        return Err(format!(
            "{} bytes is far larger than any {}",
            publisher.written(),
            kind.what()
        ));
    }
    publisher
        .flush()
        .map_err(|e| format!("cannot read the new version back: {e}"))?;
    let mut body = Vec::with_capacity(publisher.written() as usize);
    publisher
        .open_reader()
        .map_err(|e| e.to_string())?
        .take(MAX_CHECKED)
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read the new version back: {e}"))?;
    check(&name, &body)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    TrustList,
    PhoneConfig,
    Xml,
    Unchecked,
}

impl Kind {
    fn of(key: &str) -> Kind {
        if key.ends_with(".tlv") {
            Kind::TrustList
        } else if key.ends_with(".cnf.xml") {
            Kind::PhoneConfig
        } else if key.ends_with(".xml") {
            Kind::Xml
        } else {
            Kind::Unchecked
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::TrustList => "trust list",
            Kind::PhoneConfig => "phone config",
            Kind::Xml | Kind::Unchecked => "XML file",
        }
    }
}

/// The check itself, on a whole body; `key` is the case-folded name.
pub fn check(key: &str, body: &[u8]) -> Result<(), String> {
    match Kind::of(key) {
        Kind::TrustList => tlv_header(body),
        Kind::PhoneConfig => {
            let root = xml_root(body)?;
            if root.eq_ignore_ascii_case("device") || root.eq_ignore_ascii_case("Default") {
                Ok(())
            } else {
                Err(format!(
                    "root element <{root}> is not a phone config's (<device> or <Default>)"
                ))
            }
        }
        Kind::Xml => xml_root(body).map(|_| ()),
        Kind::Unchecked => Ok(()),
    }
}

/// CTL and ITL files open with TLV records: tag 0x01 (version, 2 bytes) then tag 0x02 (header
/// length, 2 bytes), lengths big-endian.
fn tlv_header(b: &[u8]) -> Result<(), String> {
    let ok =
        b.len() >= 10 && b[0] == 0x01 && b[1..3] == [0, 2] && b[5] == 0x02 && b[6..8] == [0, 2];
    if ok {
        Ok(())
    } else {
        let shown: String = b
            .iter()
            .take(16)
            .map(|&c| {
                if c.is_ascii_graphic() || c == b' ' {
                    c as char
                } else {
                    '.'
                }
            })
            .collect();
        Err(format!(
            "does not start like a CTL/ITL file (version and header-length records); starts `{shown}`"
        ))
    }
}

/// Checks that `body` is well-formed enough to be XML: an optional declaration, comments and
/// processing instructions, then exactly one root element whose tags balance. Returns the
/// root's name. Not a validating parser: entities and attribute syntax are not checked.
fn xml_root(body: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8 text, so not XML".to_string())?;
    let text = text.trim_start_matches('\u{feff}');
    let mut stack: Vec<&str> = Vec::new();
    let mut root: Option<String> = None;
    let mut rest = text;
    loop {
        let Some(lt) = rest.find('<') else {
            if !rest.trim().is_empty() && stack.is_empty() {
                return Err("text outside the root element".into());
            }
            break;
        };
        if stack.is_empty() && !rest[..lt].trim().is_empty() {
            return Err("text outside the root element".into());
        }
        rest = &rest[lt..];
        let (skip, end) = if rest.starts_with("<!--") {
            (rest.find("-->").map(|i| i + 3), None)
        } else if rest.starts_with("<![CDATA[") {
            if stack.is_empty() {
                return Err("CDATA outside the root element".into());
            }
            (rest.find("]]>").map(|i| i + 3), None)
        } else if rest.starts_with("<?") || rest.starts_with("<!") {
            (rest.find('>').map(|i| i + 1), None)
        } else {
            let close = rest.find('>').ok_or("a tag is never closed")?;
            (Some(close + 1), Some(&rest[1..close]))
        };
        let skip = skip.ok_or("a comment or section is never closed")?;
        if let Some(tag) = end {
            element(tag, &mut stack, &mut root)?;
        }
        rest = &rest[skip..];
    }
    if let Some(open) = stack.last() {
        return Err(format!("<{open}> is never closed"));
    }
    root.ok_or_else(|| "no root element".into())
}

/// One tag's inside (between `<` and `>`): opens, closes or is empty.
fn element<'a>(
    tag: &'a str,
    stack: &mut Vec<&'a str>,
    root: &mut Option<String>,
) -> Result<(), String> {
    let name_of = |t: &'a str| -> Result<&'a str, String> {
        let n = t
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or("");
        let valid = n
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_' || c == ':');
        if valid {
            Ok(n)
        } else {
            Err(format!(
                "`<{}>` is not a tag",
                t.chars().take(20).collect::<String>()
            ))
        }
    };
    if let Some(closing) = tag.strip_prefix('/') {
        let n = name_of(closing.trim())?;
        return match stack.pop() {
            Some(open) if open == n => Ok(()),
            Some(open) => Err(format!("</{n}> closes <{open}>")),
            None => Err(format!("</{n}> closes nothing")),
        };
    }
    let n = name_of(tag)?;
    if stack.is_empty() {
        if root.is_some() {
            return Err(format!("a second root element <{n}>"));
        }
        *root = Some(n.to_string());
    }
    if !tag.ends_with('/') {
        stack.push(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_configs_pass() {
        for (name, body) in [
            (
                "sep001122aabbcc.cnf.xml",
                &b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- generated -->\n<device xsi:type=\"axl:IPPhone\"><loadInformation>SIP45</loadInformation><x/><![CDATA[a<b]]></device>\n"[..],
            ),
            ("xmldefault.cnf.xml", b"<Default><callManagerGroup/></Default>"),
            ("dialplan.xml", b"<DIALTEMPLATE><TEMPLATE MATCH=\"*\" /></DIALTEMPLATE>"),
            ("itlfile.tlv", &[1, 0, 2, 1, 0, 2, 0, 2, 1, 0x50, 3, 0][..]),
            ("kern.sbn", b"<html>anything goes</html>"),
        ] {
            assert_eq!(check(name, body), Ok(()), "{name}");
        }
    }

    #[test]
    fn proxy_error_pages_fail() {
        let page =
            b"<html><head><title>Proxy Error</title></head><body>Bad gateway<br></body></html>";
        assert!(check("itlfile.tlv", page).unwrap_err().contains("CTL/ITL"));
        assert!(check("sep001122aabbcc.cnf.xml", page).is_err());
        assert!(
            check("sep001122aabbcc.cnf.xml", b"<html><body>ok</body></html>")
                .unwrap_err()
                .contains("<html>")
        );
        assert!(check("dialplan.xml", b"Service Unavailable").is_err());
        assert!(check("dialplan.xml", b"<a></b>").is_err());
        assert!(check("dialplan.xml", b"<a>").is_err());
        assert!(check("dialplan.xml", b"<a/><b/>").is_err());
        assert!(check("dialplan.xml", b"").is_err());
    }

    mod never_panic {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn checks(data in proptest::collection::vec(any::<u8>(), 0..512),
                      soup in "(<[a-zA-Z/!?\\[ ]{0,6}>?|[a-z]{0,4}){0,40}") {
                let _ = check("a.cnf.xml", &data);
                let _ = check("a.tlv", &data);
                let _ = check("a.xml", soup.as_bytes());
            }
        }
    }
}
