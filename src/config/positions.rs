//! Where each key of a YAML document sits, so that an error found after deserializing (a value out
//! of range, a duplicate address) can still point at `FILE:LINE:COL`. serde never sees positions;
//! this walks the YAML event stream once and names every mapping key and sequence item with the
//! dotted path used in error messages: `tftp.max_blksize`, `upstreams[1].url`.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span};

/// A 1-based line and column.
pub type LineCol = (usize, usize);

/// Dotted paths of a document mapped to the position of their key (mapping entries) or of the
/// item itself (sequence items).
#[derive(Debug, Default)]
pub struct Positions {
    by_path: HashMap<String, LineCol>,
    /// Every path in document order, to name the key around a syntax error.
    in_order: Vec<(String, LineCol)>,
}

enum Frame {
    Map {
        path: String,
        /// The path of the entry whose value comes next; `None` while a key is expected.
        pending: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

impl Positions {
    /// Scans `text`. A syntax error stops the scan; what was seen before it is kept.
    pub fn scan(text: &str) -> Positions {
        let mut out = Positions::default();
        let mut stack: Vec<Frame> = Vec::new();
        for event in Parser::new_from_str(text) {
            let Ok((event, span)) = event else { break };
            match event {
                Event::Scalar(ref value, ..) => {
                    if let Some(Frame::Map { path, pending }) = stack.last_mut() {
                        if pending.is_none() {
                            // A key: remember where it is; its value comes next.
                            let key = join(path, value);
                            out.record(&key, span);
                            *pending = Some(key);
                            continue;
                        }
                    }
                    out.value_node(&mut stack, span);
                }
                Event::Alias(_) => {
                    out.value_node(&mut stack, span);
                }
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    let path = match stack.last_mut() {
                        // A collection used as a key: keep the walk consistent, never named.
                        Some(Frame::Map { path, pending }) if pending.is_none() => {
                            let key = join(path, "?");
                            *pending = Some(key.clone());
                            key
                        }
                        _ => out.value_node(&mut stack, span),
                    };
                    stack.push(if matches!(event, Event::MappingStart(..)) {
                        Frame::Map {
                            path,
                            pending: None,
                        }
                    } else {
                        Frame::Seq { path, next: 0 }
                    });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    // The collection was the value of its parent's entry: the next node is a key.
                    if let Some(Frame::Map { pending, .. }) = stack.last_mut() {
                        *pending = None;
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Starts a value node under the top frame and returns its path.
    fn value_node(&mut self, stack: &mut [Frame], span: Span) -> String {
        match stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { pending, path }) => {
                // A scalar value completes the entry; a collection clears `pending` at its end.
                pending.take().unwrap_or_else(|| path.clone())
            }
            Some(Frame::Seq { path, next }) => {
                let item = format!("{path}[{next}]");
                *next += 1;
                self.record(&item, span);
                item
            }
        }
    }

    fn record(&mut self, path: &str, span: Span) {
        let at = (span.start.line(), span.start.col() + 1);
        self.by_path.entry(path.to_string()).or_insert(at);
        self.in_order.push((path.to_string(), at));
    }

    /// The position of `path`, if the document spells it out.
    pub fn get(&self, path: &str) -> Option<LineCol> {
        self.by_path.get(path).copied()
    }

    /// The position of `path` or of its closest ancestor present in the document, else 1:1 (a
    /// default value that conflicts with another setting has no place of its own).
    pub fn nearest(&self, path: &str) -> LineCol {
        let mut p = path;
        loop {
            if let Some(at) = self.get(p) {
                return at;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return (1, 1),
            }
        }
    }

    /// The last key or item that starts at or before `at`: the key a syntax error is in.
    pub fn path_before(&self, at: LineCol) -> Option<&str> {
        self.in_order
            .iter()
            .rev()
            .find(|(path, pos)| *pos < at && !path.contains('?'))
            .map(|(path, _)| path.as_str())
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
log: info
tftp:
  listen: [\"0.0.0.0:69\", \"[::]:69\"]
  max_blksize: 1468
upstreams:
  - url: http://a:6970
    timeout: 10s
  - url: tftp://b
sync:
  intervals:
    config: 5m
access:
  allow:
    - 10.0.0.0/8
";

    #[test]
    fn names_keys_and_items_with_their_positions() {
        let p = Positions::scan(DOC);
        assert_eq!(p.get("log"), Some((1, 1)));
        assert_eq!(p.get("tftp"), Some((2, 1)));
        assert_eq!(p.get("tftp.listen"), Some((3, 3)));
        assert_eq!(p.get("tftp.listen[0]"), Some((3, 12)));
        assert_eq!(p.get("tftp.listen[1]"), Some((3, 26)));
        assert_eq!(p.get("tftp.max_blksize"), Some((4, 3)));
        assert_eq!(p.get("upstreams[0]"), Some((6, 5)));
        assert_eq!(p.get("upstreams[0].url"), Some((6, 5)));
        assert_eq!(p.get("upstreams[0].timeout"), Some((7, 5)));
        assert_eq!(p.get("upstreams[1].url"), Some((8, 5)));
        assert_eq!(p.get("sync.intervals.config"), Some((11, 5)));
        assert_eq!(p.get("access.allow[0]"), Some((14, 7)));
    }

    #[test]
    fn absent_keys_fall_back_to_their_closest_ancestor() {
        let p = Positions::scan(DOC);
        assert_eq!(p.nearest("sync.intervals.firmware"), (10, 3));
        assert_eq!(p.nearest("admin.listen"), (1, 1));
    }

    #[test]
    fn a_syntax_error_is_placed_after_the_last_key_seen() {
        let p = Positions::scan("tftp:\n  retries: 3\n timeout: 1s\n");
        assert_eq!(p.path_before((3, 2)), Some("tftp.retries"));
    }
}
