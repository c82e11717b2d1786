//! Readers for the files discovery follows (domain.md): phone configs (`SEP<MAC>.cnf.xml`,
//! `XMLDefault.cnf.xml`) for their firmware loads and locale directories, `.loads` files for
//! their image lists, and CUCM's `ConfigFileCacheList.txt`.
//!
//! All of them take untrusted bytes from the network: they never panic, never allocate more than
//! a small multiple of their input, and skip what they cannot read instead of failing.

/// What a phone config names: firmware loads (`.loads` names without the extension) and locale
/// directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigRefs {
    /// `<loadInformation>` values, per phone or per model (`loadInformationNNN model="…"`).
    pub loads: Vec<String>,
    /// `<userLocale><name>`: directories of dictionaries, fonts, `mk-sip.jar`.
    pub user_locales: Vec<String>,
    /// `<networkLocale>` (or `<networkLocaleInfo><name>`): directories of tones.
    pub network_locales: Vec<String>,
}

/// Reads a `.cnf.xml` (signed `.sgn` variants too: the XML follows a binary header, and this
/// scanner looks for elements anywhere). Tolerant of letter case, attributes and whitespace; not
/// a validating XML parser, which phones' configs do not need.
pub fn config_refs(data: &[u8]) -> ConfigRefs {
    let text = String::from_utf8_lossy(data);
    let mut refs = ConfigRefs::default();
    for el in elements(&text) {
        let name = el.name.to_ascii_lowercase();
        if let Some(suffix) = name.strip_prefix("loadinformation") {
            // `loadInformation` or `loadInformation435 model="…"`.
            if suffix.bytes().all(|b| b.is_ascii_digit()) {
                if let Some(v) = el.text.and_then(clean_value) {
                    push_unique(&mut refs.loads, v);
                }
            }
        } else if name == "userlocale" {
            if let Some(v) = el.inner().and_then(|i| child_text(i, "name")) {
                push_unique(&mut refs.user_locales, v);
            }
        } else if name == "networklocale" {
            if let Some(v) = el.text.and_then(clean_value) {
                push_unique(&mut refs.network_locales, v);
            }
        } else if name == "networklocaleinfo" {
            if let Some(v) = el.inner().and_then(|i| child_text(i, "name")) {
                push_unique(&mut refs.network_locales, v);
            }
        }
    }
    refs
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.iter().any(|x| x.eq_ignore_ascii_case(&s)) {
        v.push(s);
    }
}

/// One start tag found by [`elements`]: its name, the text up to the next `<` (a leaf's value)
/// and what follows the start tag.
struct Element<'a> {
    name: &'a str,
    text: Option<&'a str>,
    body: &'a str,
}

/// How far an element's children may reach: the ones read here (`<userLocale>`) are small, and
/// a bound keeps hostile input linear.
const MAX_INNER: usize = 4096;

impl<'a> Element<'a> {
    /// Everything up to the matching end tag, if it comes within [`MAX_INNER`] bytes.
    fn inner(&self) -> Option<&'a str> {
        let mut end = self.body.len().min(MAX_INNER);
        while !self.body.is_char_boundary(end) {
            end -= 1;
        }
        let window = &self.body[..end];
        find_ignore_case(window, &format!("</{}", self.name)).map(|e| &window[..e])
    }
}

fn elements(text: &str) -> impl Iterator<Item = Element<'_>> {
    let mut pos = 0;
    // The next `>` at or after `pos` (absolute), found once and reused: keeps `<a<a<a…` linear.
    let mut next_gt: Option<usize> = None;
    std::iter::from_fn(move || loop {
        let start = pos + text.get(pos..)?.find('<')?;
        let after = start + 1;
        let rest = &text[after..];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-'))
            .unwrap_or(rest.len());
        pos = after;
        if name_len == 0 {
            continue; // `</x>`, `<?xml`, `<!--`: not a start tag
        }
        let name = &rest[..name_len];
        if next_gt.is_none_or(|g| g < after) {
            next_gt = Some(after + rest.find('>')?);
        }
        let close = next_gt? - after;
        if rest[..close].ends_with('/') {
            continue; // `<x/>`: no value
        }
        let body_start = after + close + 1;
        let body = &text[body_start..];
        let text_end = body.find('<').unwrap_or(body.len());
        return Some(Element {
            name,
            text: Some(&body[..text_end]),
            body,
        });
    })
}

fn find_ignore_case(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    (0..=h.len() - n.len()).find(|&i| h[i..i + n.len()].eq_ignore_ascii_case(n))
}

fn child_text(inner: &str, child: &str) -> Option<String> {
    elements(inner)
        .find(|e| e.name.eq_ignore_ascii_case(child))
        .and_then(|e| e.text)
        .and_then(clean_value)
}

/// A value usable as a file or directory name: trimmed, entities decoded, no path tricks.
fn clean_value(raw: &str) -> Option<String> {
    let v = raw
        .trim()
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'");
    let ok = !v.is_empty()
        && v.len() <= 128
        && !v.contains("..")
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != '\\');
    ok.then_some(v)
}

/// The image file names a `.loads` file lists, in order, without duplicates (letter case
/// ignored), and without `.loads` names of its own.
///
/// The file is a binary signed header followed by CRLF text (domain.md). The header is skipped
/// by its own length record (TLV tag 0x02) when that points at text, else by taking the text
/// that follows the last byte no text file contains; bare CR counts as a line end because the
/// header is padded with 0x0D. Lines: `#` comments, blank lines, trailing spaces, and the
/// `name size md5` variant (first field only).
pub fn loads_images(data: &[u8]) -> Vec<String> {
    loads_entries(data, usize::MAX)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// The images a `.loads` file lists, each with the size the line gives (`name size md5`
/// variant), without duplicates (case-insensitive, checked in constant time per line), at most
/// `limit` of them: the caller asks for one more than it accepts to learn that a list is too
/// long without reading the rest.
pub fn loads_entries(data: &[u8], limit: usize) -> Vec<(String, Option<u64>)> {
    let text = &data[text_start(data)..];
    let mut out: Vec<(String, Option<u64>)> = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    for line in text.split(|&b| b == b'\n' || b == b'\r') {
        if out.len() >= limit {
            break;
        }
        let line = String::from_utf8_lossy(line);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if !is_image_name(first) {
            continue;
        }
        if seen.insert(first.to_ascii_lowercase()) {
            let size = fields.next().and_then(|s| s.parse().ok());
            out.push((first.to_string(), size));
        }
    }
    out
}

fn is_image_name(s: &str) -> bool {
    s.len() <= 128
        && s.contains('.')
        && !s.starts_with('.')
        && !s.contains("..")
        && !s.to_ascii_lowercase().ends_with(".loads")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+'))
}

fn is_text_byte(b: u8) -> bool {
    matches!(b, b'\r' | b'\n' | b'\t') || (0x20..0x7f).contains(&b)
}

/// Where the plain text of a `.loads` file begins.
fn text_start(data: &[u8]) -> usize {
    if let Some(len) = tlv_header_len(data) {
        let mut i = len;
        while i < data.len() && matches!(data[i], 0x0d | 0x00) {
            i += 1;
        }
        if data[i..].iter().all(|&b| is_text_byte(b)) {
            return len;
        }
    }
    // No usable length record: the text is what follows the last byte text never holds.
    data.iter()
        .rposition(|&b| !is_text_byte(b))
        .map_or(0, |p| p + 1)
}

/// The header length from the signed header's TLV records (tag, 16-bit big-endian length,
/// value), if the first records parse and one of them is tag 0x02 with a 2-byte value.
fn tlv_header_len(data: &[u8]) -> Option<usize> {
    let mut i = 0;
    for _ in 0..16 {
        let tag = *data.get(i)?;
        let len = u16::from_be_bytes([*data.get(i + 1)?, *data.get(i + 2)?]) as usize;
        let value = data.get(i + 3..i + 3 + len)?;
        if tag == 0x02 && len == 2 {
            let hl = u16::from_be_bytes([value[0], value[1]]) as usize;
            return (hl > i && hl <= data.len()).then_some(hl);
        }
        i += 3 + len;
    }
    None
}

/// `ConfigFileCacheList.txt`: `name<whitespace>length` per line. Lines that do not parse are
/// skipped; a name without a length gets `None`.
pub fn config_list(data: &[u8]) -> Vec<(String, Option<u64>)> {
    let mut reader = ConfigListReader::new(usize::MAX);
    reader.feed(data);
    reader.finish()
}

/// Longest line of `ConfigFileCacheList.txt` kept (a file name and a length fit in far less);
/// a longer one is skipped, never buffered.
const MAX_LIST_LINE: usize = 1024;

/// Reads `ConfigFileCacheList.txt` as it streams in, chunk by chunk: holds one line at most
/// (bounded) and at most `max_entries` entries, then ignores the rest ([`Self::full`] says
/// so). Memory stays bounded whatever an upstream sends.
#[derive(Debug)]
pub struct ConfigListReader {
    line: Vec<u8>,
    overlong: bool,
    entries: Vec<(String, Option<u64>)>,
    max_entries: usize,
}

impl ConfigListReader {
    pub fn new(max_entries: usize) -> ConfigListReader {
        ConfigListReader {
            line: Vec::new(),
            overlong: false,
            entries: Vec::new(),
            max_entries,
        }
    }

    /// Whether the entry limit was reached; more input is ignored.
    pub fn full(&self) -> bool {
        self.entries.len() >= self.max_entries
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && !self.full() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.take(&chunk[..end]);
                    self.end_line();
                    chunk = &chunk[end + 1..];
                }
                None => {
                    self.take(chunk);
                    chunk = &[];
                }
            }
        }
    }

    fn take(&mut self, part: &[u8]) {
        if self.overlong || self.line.len() + part.len() > MAX_LIST_LINE {
            self.overlong = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn end_line(&mut self) {
        let overlong = std::mem::take(&mut self.overlong);
        let line = std::mem::take(&mut self.line);
        if overlong {
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let mut fields = text.split_whitespace();
        let Some(name) = fields.next() else { return };
        if name.starts_with('#') || crate::name::FileName::parse(name).is_err() {
            return;
        }
        let size = fields.next().and_then(|s| s.parse().ok());
        self.entries.push((name.to_string(), size));
    }

    /// The entries read (a last line without a newline counts).
    pub fn finish(mut self) -> Vec<(String, Option<u64>)> {
        if !self.line.is_empty() && !self.full() {
            self.end_line();
        }
        self.entries
    }
}

/// The device a phone file belongs to, upper-case (`SEP001122AABBCC` for
/// `SEP001122AABBCC.cnf.xml`, `ITLSEP001122AABBCC.tlv` or `sep001122aabbcc.cnf.xml.sgn`), or
/// `None` for a file that is not per device.
pub fn device_of(name: &str) -> Option<String> {
    let base = name.rsplit('/').next().unwrap_or(name).to_ascii_uppercase();
    let base = base
        .strip_prefix("CTL")
        .or_else(|| base.strip_prefix("ITL"))
        .unwrap_or(&base);
    let stem = base.split('.').next().unwrap_or("");
    let mac = stem.strip_prefix("SEP")?;
    (mac.len() == 12 && mac.bytes().all(|b| b.is_ascii_hexdigit())).then(|| stem.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XMLDEFAULT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Default>
  <callManagerGroup><members><member priority="0"><callManager>
    <name>CUCM</name><ports><ethernetPhonePort>2000</ethernetPhonePort></ports>
  </callManager></member></members></callManagerGroup>
  <loadInformation30018 model="IP Phone 7961">SCCP41.9-4-2SR4-3S</loadInformation30018>
  <loadInformation435 model="Cisco IP Phone 7945">SCCP45.9-4-2SR4-3S</loadInformation435>
  <loadInformation36670 model="Cisco IP Phone 8865">  sip88xx.14-2-1-0101-15 </loadInformation36670>
  <loadInformation499 model="Cisco IP Phone 7811"></loadInformation499>
  <loadInformation436 model="Cisco IP Phone 7965">SCCP45.9-4-2SR4-3S</loadInformation436>
  <authenticationURL></authenticationURL>
</Default>"#;

    #[test]
    fn xmldefault_lists_one_load_per_model_without_duplicates() {
        let refs = config_refs(XMLDEFAULT.as_bytes());
        assert_eq!(
            refs.loads,
            [
                "SCCP41.9-4-2SR4-3S",
                "SCCP45.9-4-2SR4-3S",
                "sip88xx.14-2-1-0101-15"
            ]
        );
    }

    #[test]
    fn phone_config_gives_load_and_locales() {
        let cnf = r#"<device xsi:type="axl:IPPhone" ctiid="12">
<fullConfig>true</fullConfig>
<loadInformation>SIP45.9-4-2SR3-1S</loadInformation>
<vendorConfig><disableSpeaker>false</disableSpeaker></vendorConfig>
<userLocale>
  <name>English_United_States</name>
  <uid>1</uid>
  <langCode>en_US</langCode>
</userLocale>
<networkLocale>United_States</networkLocale>
<networkLocaleInfo><name>Canada</name><version>1</version></networkLocaleInfo>
<LOADINFORMATION>sip45.9-4-2SR3-1S</LOADINFORMATION>
</device>"#;
        let refs = config_refs(cnf.as_bytes());
        assert_eq!(refs.loads, ["SIP45.9-4-2SR3-1S"]);
        assert_eq!(refs.user_locales, ["English_United_States"]);
        assert_eq!(refs.network_locales, ["United_States", "Canada"]);
    }

    #[test]
    fn config_values_cannot_escape() {
        let refs = config_refs(
            b"<loadInformation>../../etc/passwd</loadInformation><userLocale><name>a/b</name></userLocale>",
        );
        assert!(refs.loads.is_empty());
        assert!(refs.user_locales.is_empty());
    }

    /// A `.loads` file as the real ones are built: TLV header (tag 0x02 = header length, 0x0C a
    /// 256-byte signature, 0x0E the file's own name, NUL-terminated), 0x0D padding, CRLF text.
    pub(crate) fn signed_loads(own_name: &str, text: &str, with_length_record: bool) -> Vec<u8> {
        let mut sig = Vec::new();
        for i in 0..256u32 {
            // Signature bytes include LF, CR, printable runs and NULs.
            sig.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
        }
        sig[10] = b'\n';
        sig[11..20].copy_from_slice(b"fake.sbn ");
        let mut name = own_name.as_bytes().to_vec();
        name.push(0);
        let mut h = vec![0x01, 0x00, 0x02, 0x01, 0x00];
        let len_at = h.len();
        if with_length_record {
            h.extend([0x02, 0x00, 0x02, 0x00, 0x00]);
        } else {
            h.extend([0x03, 0x00, 0x02, 0x00, 0x00]);
        }
        h.extend([0x0c, 0x01, 0x00]);
        h.extend(&sig);
        h.extend([0x0e, 0x00, name.len() as u8]);
        h.extend(&name);
        h.extend([0x0d; 7]);
        let total = h.len() as u16;
        if with_length_record {
            h[len_at + 3..len_at + 5].copy_from_slice(&total.to_be_bytes());
        }
        h.extend(text.as_bytes());
        h
    }

    const LOADS_TEXT: &str = "# This file is generated\r\n# do not edit\r\n\r\napps45.9-4-2ES26.sbn\r\ncnu45.9-4-2ES26.sbn  \r\nCVM45SCCP.9-4-2ES26.SBN\r\ndsp45.9-4-2ES26.sbn\r\njar45sccp.9-4-2ES26.sbn\r\nAPPS45.9-4-2ES26.sbn\r\n";

    #[test]
    fn loads_with_length_record() {
        let data = signed_loads("SCCP45.9-4-2SR4-3S.loads", LOADS_TEXT, true);
        assert_eq!(
            loads_images(&data),
            [
                "apps45.9-4-2ES26.sbn",
                "cnu45.9-4-2ES26.sbn",
                "CVM45SCCP.9-4-2ES26.SBN",
                "dsp45.9-4-2ES26.sbn",
                "jar45sccp.9-4-2ES26.sbn"
            ]
        );
    }

    #[test]
    fn loads_without_length_record_falls_back_to_the_trailing_text() {
        let data = signed_loads("SCCP45.9-4-2SR4-3S.loads", LOADS_TEXT, false);
        assert_eq!(loads_images(&data).len(), 5);
        assert!(!loads_images(&data).iter().any(|n| n.contains("fake")));
    }

    #[test]
    fn loads_name_size_md5_variant_and_plain_text() {
        let text = "# wireless\r\nWLAN.1-4-1-17.sbn 4096 0123456789abcdef0123456789abcdef\r\nW2.bin 10 ffff\r\n";
        assert_eq!(
            loads_images(text.as_bytes()),
            ["WLAN.1-4-1-17.sbn", "W2.bin"]
        );
        let data = signed_loads("CP7925G-1.4.1SR1.loads", text, true);
        assert_eq!(loads_images(&data), ["WLAN.1-4-1-17.sbn", "W2.bin"]);
    }

    #[test]
    fn config_list_lines() {
        let l = config_list(b"SEP001122AABBCC.cnf.xml 4321\nSEP001122AABBCD.cnf.xml\t99\r\n\n  \nbad../x 3\nXMLDefault.cnf.xml\n");
        assert_eq!(
            l,
            [
                ("SEP001122AABBCC.cnf.xml".to_string(), Some(4321)),
                ("SEP001122AABBCD.cnf.xml".to_string(), Some(99)),
                ("bad../x".to_string(), Some(3)),
                ("XMLDefault.cnf.xml".to_string(), None),
            ]
        );
    }

    #[test]
    fn devices_from_names() {
        assert_eq!(
            device_of("ITLSEP001122aabbcc.tlv").as_deref(),
            Some("SEP001122AABBCC")
        );
        assert_eq!(
            device_of("sep001122aabbcc.cnf.xml.sgn").as_deref(),
            Some("SEP001122AABBCC")
        );
        assert_eq!(device_of("XMLDefault.cnf.xml"), None);
        assert_eq!(device_of("SEPDefault.cnf.xml"), None);
    }

    #[test]
    fn hostile_input_stays_linear() {
        let mut soup = Vec::new();
        for _ in 0..200_000 {
            soup.extend_from_slice(b"<userLocale x<a");
        }
        let started = std::time::Instant::now();
        let _ = config_refs(&soup);
        let _ = config_refs(&[b'<', b'a'].repeat(1 << 20));
        let _ = loads_images(&[b'\r'; 1 << 21]);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn hundred_thousand_distinct_images_parse_in_linear_time() {
        let mut text = String::new();
        for i in 0..100_000 {
            text.push_str(&format!("image{i:06}.sbn\r\nIMAGE{i:06}.SBN\r\n"));
        }
        let started = std::time::Instant::now();
        assert_eq!(loads_images(text.as_bytes()).len(), 100_000);
        // Quadratic duplicate checks take minutes here; a hash set takes milliseconds
        // (optimized; an unoptimized build is about ten times slower).
        let limit = if cfg!(debug_assertions) { 20 } else { 2 };
        assert!(started.elapsed() < std::time::Duration::from_secs(limit));
        assert_eq!(loads_entries(text.as_bytes(), 11).len(), 11);
    }

    #[test]
    fn config_list_reader_holds_one_bounded_line_and_stops_at_its_limit() {
        let mut r = ConfigListReader::new(2);
        r.feed(b"SEP001122AABBCC.cnf");
        r.feed(b".xml 12\n");
        r.feed(&[b'x'; 5000]);
        r.feed(b"\nXMLDefault.cnf.xml 3\nSEP0011223344FF.cnf.xml 1\n");
        assert!(r.full());
        assert!(r.line.capacity() <= 4 * MAX_LIST_LINE);
        assert_eq!(
            r.finish(),
            [
                ("SEP001122AABBCC.cnf.xml".to_string(), Some(12)),
                ("XMLDefault.cnf.xml".to_string(), Some(3)),
            ]
        );
    }

    mod never_panic {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn loads_parser(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let _ = loads_images(&data);
            }

            #[test]
            fn loads_parser_on_header_like_input(
                head in proptest::collection::vec(any::<u8>(), 0..64),
                text in "[ -~\r\n#]{0,400}",
            ) {
                let mut data = vec![0x02, 0x00, 0x02];
                data.extend(&head);
                data.extend(text.as_bytes());
                for name in loads_images(&data) {
                    prop_assert!(is_image_name(&name));
                }
            }

            #[test]
            fn config_parser(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let _ = config_refs(&data);
            }

            #[test]
            fn config_parser_on_tag_soup(s in "(<[a-zA-Z0-9/ =\"]{0,20}>?|[a-z_.]{0,10}){0,60}") {
                let _ = config_refs(s.as_bytes());
                let _ = config_list(s.as_bytes());
            }
        }
    }
}
