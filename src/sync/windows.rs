//! `sync.windows`: when each class of file may be revalidated or prefetched by the sync worker,
//! and how fast (`max_rate` inside a window, `sync.max_rate` outside), as daily windows in the
//! box's local time. This is the WAN optimisers' prepositioning schedule: firmware at night,
//! configs all day. A phone's miss is never held by a window; only the background waits.
//!
//! Local time is the box's (`TZ`, else `/etc/localtime`), read through [`WallClock`] so tests
//! inject their own. A window is a span of wall-clock time, so DST needs no special case: on
//! the night clocks go back, a window over the repeated hour is open both times; on the night
//! they go forward, the part of a window inside the skipped hour does not happen (a window
//! wholly inside it waits for the next day). Windows may cross midnight (`22:00-06:00`).

use jiff::civil::Time;
use jiff::{ToSpan, Zoned};

use crate::cache::FileClass;
use crate::config::{ClassWindows, SyncConfig, SyncWindows};

/// Seconds in a day.
const DAY: u32 = 24 * 3600;

/// The wall clock and time zone the schedule is read in.
pub trait WallClock: Send + Sync {
    /// Now, in the zone the windows are written in.
    fn now(&self) -> Zoned;
}

/// The box's clock in its local zone: `TZ` if set, else `/etc/localtime` (jiff re-reads a
/// changed zone file, so a box moved to another zone needs no restart).
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> Zoned {
        Zoned::now()
    }
}

/// One daily window `HH:MM-HH:MM`, as seconds of the day; `end < start` crosses midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyWindow {
    start: u32,
    end: u32,
    /// `Some(bits/s)` when the window sets its own rate (0 = unlimited).
    pub max_rate: Option<u64>,
}

impl DailyWindow {
    /// Parses `22:00-06:00` (`24:00` is allowed as an end).
    pub fn parse(text: &str, max_rate: Option<u64>) -> Result<DailyWindow, String> {
        let advice = "write a daily window as HH:MM-HH:MM in local time, e.g. 22:00-06:00";
        let (a, b) = text
            .split_once('-')
            .ok_or_else(|| format!("`{text}` is not a window: {advice}"))?;
        let start = clock_time(a.trim(), false)
            .ok_or_else(|| format!("`{text}`: `{}` is not a time of day: {advice}", a.trim()))?;
        let end = clock_time(b.trim(), true)
            .ok_or_else(|| format!("`{text}`: `{}` is not a time of day: {advice}", b.trim()))?;
        if start == end % DAY {
            return Err(format!(
                "`{text}` starts where it ends; write `always` for the whole day"
            ));
        }
        Ok(DailyWindow {
            start,
            end: end % DAY,
            max_rate,
        })
    }

    /// Whether a second of the day lies in the window (start included, end excluded).
    pub fn contains(&self, second: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&second)
        } else {
            second >= self.start || second < self.end
        }
    }

    /// The window as one or two spans of the day `[from, to)`.
    fn spans(&self) -> Vec<(u32, u32)> {
        if self.start < self.end {
            vec![(self.start, self.end)]
        } else {
            vec![(self.start, DAY), (0, self.end)]
        }
    }

    /// Whether two windows share any minute.
    pub fn overlaps(&self, other: &DailyWindow) -> bool {
        self.spans()
            .iter()
            .any(|a| other.spans().iter().any(|b| a.0 < b.1 && b.0 < a.1))
    }

    /// Its boundaries as times of day.
    fn edges(&self) -> [Time; 2] {
        [time_of(self.start), time_of(self.end)]
    }
}

fn time_of(second: u32) -> Time {
    Time::new(
        (second / 3600) as i8,
        (second / 60 % 60) as i8,
        (second % 60) as i8,
        0,
    )
    .unwrap_or(Time::midnight())
}

/// `HH:MM` as seconds of the day; `24:00` only as an end.
fn clock_time(s: &str, is_end: bool) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    match (h, m) {
        (24, 0) if is_end => Some(DAY),
        (0..=23, 0..=59) => Some(h * 3600 + m * 60),
        _ => None,
    }
}

/// The windows of one class, parsed; problems carry the item's index.
pub fn class_windows(w: &ClassWindows) -> Result<Option<Vec<DailyWindow>>, (usize, String)> {
    match w {
        ClassWindows::Always => Ok(None),
        ClassWindows::Windows(list) => {
            let mut out: Vec<DailyWindow> = Vec::new();
            for (i, spec) in list.iter().enumerate() {
                let w = DailyWindow::parse(&spec.at, spec.max_rate).map_err(|e| (i, e))?;
                if let Some(j) = out.iter().position(|o| o.overlaps(&w)) {
                    return Err((
                        i,
                        format!(
                            "`{}` overlaps `{}` (item {j}); merge them into one window",
                            spec.at, list[j].at
                        ),
                    ));
                }
                out.push(w);
            }
            if out.is_empty() {
                return Err((0, "an empty list would never sync this class; write `always` or at least one window such as 22:00-06:00".into()));
            }
            Ok(Some(out))
        }
    }
}

/// `sync.windows` ready to ask: per class, `None` for always, else its windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    classes: [Option<Vec<DailyWindow>>; 5],
}

impl Schedule {
    /// From a validated configuration (a window that does not parse counts as always: config
    /// validation has refused it already).
    pub fn new(w: &SyncWindows) -> Schedule {
        let get = |c: &ClassWindows| class_windows(c).unwrap_or(None);
        Schedule {
            classes: [
                get(&w.config),
                get(&w.defaults),
                get(&w.locale),
                get(&w.firmware),
                get(&w.other),
            ],
        }
    }

    pub fn of(s: &SyncConfig) -> Schedule {
        Schedule::new(&s.windows)
    }

    fn windows(&self, class: FileClass) -> Option<&[DailyWindow]> {
        self.classes[super::class_index(class)].as_deref()
    }

    /// Whether the sync worker may revalidate or prefetch `class` at `now`.
    pub fn open(&self, class: FileClass, now: &Zoned) -> bool {
        let second = second_of_day(now);
        self.windows(class)
            .is_none_or(|ws| ws.iter().any(|w| w.contains(second)))
    }

    /// The rate in force at `now`: the strictest `max_rate` of the open windows that set one
    /// (0 = unlimited counts as the loosest), else `base` (`sync.max_rate`).
    pub fn rate(&self, now: &Zoned, base: u64) -> u64 {
        let second = second_of_day(now);
        let rates = self
            .classes
            .iter()
            .flatten()
            .flatten()
            .filter(|w| w.contains(second))
            .filter_map(|w| w.max_rate);
        let mut found = None;
        for r in rates {
            found = Some(match found {
                None => r,
                Some(0) => r,
                Some(f) if r == 0 => f,
                Some(f) => r.min(f),
            });
        }
        found.unwrap_or(base)
    }

    /// The next instant after `now` at which a window opens or closes, if any class has
    /// windows. A boundary that falls in a DST gap maps to the first instant after it.
    pub fn next_change(&self, now: &Zoned) -> Option<Zoned> {
        let mut best: Option<Zoned> = None;
        for w in self.classes.iter().flatten().flatten() {
            for t in w.edges() {
                for days in 0..=1i64 {
                    let Ok(date) = now.date().checked_add(days.days()) else {
                        continue;
                    };
                    let Ok(at) = date.to_datetime(t).to_zoned(now.time_zone().clone()) else {
                        continue;
                    };
                    if at > *now && best.as_ref().is_none_or(|b| at < *b) {
                        best = Some(at);
                        break;
                    }
                }
            }
        }
        best
    }
}

/// What one pass may do, decided at its start from the windows: which classes are open, and
/// whether firmware may be fetched for configured and for planned loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    open: [bool; 5],
    /// `sync --loads`: planned loads are fetched whatever the windows say, and nothing else.
    planned_only: bool,
}

impl Plan {
    pub fn open(&self, class: FileClass) -> bool {
        !self.planned_only && self.open[super::class_index(class)]
    }

    /// Whether the pass may fetch the files of a load (`planned`: in `sync.loads`).
    pub fn fetch_load(&self, planned: bool) -> bool {
        if self.planned_only {
            planned
        } else {
            self.open(FileClass::Firmware)
        }
    }
}

impl super::Syncer {
    /// Reads the windows at the start of a pass: what it may do, and the rate in force (set
    /// on the pacer for the whole pass).
    pub(super) fn plan_by_windows(&self, settings: &SyncConfig, scope: &super::Scope) -> Plan {
        let now = self.clock.now();
        let schedule = Schedule::of(settings);
        self.throttle
            .set_rate(schedule.rate(&now, settings.max_rate));
        let mut open = [true; 5];
        for (i, c) in super::CLASSES.iter().enumerate() {
            open[i] = schedule.open(*c, &now);
        }
        Plan {
            open,
            planned_only: *scope == super::Scope::PlannedLoads,
        }
    }

    /// When the worker should look again because a window opens or closes (`None`: no class
    /// has windows), as a delay from now.
    pub(super) fn next_window_change(&self) -> Option<std::time::Duration> {
        let now = self.clock.now();
        let next = Schedule::of(&self.settings()).next_change(&now)?;
        Some(
            next.timestamp()
                .duration_since(now.timestamp())
                .unsigned_abs(),
        )
    }
}

fn second_of_day(now: &Zoned) -> u32 {
    let t = now.time();
    t.hour() as u32 * 3600 + t.minute() as u32 * 60 + t.second() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WindowSpec;
    use jiff::tz::TimeZone;

    fn at(s: &str) -> WindowSpec {
        WindowSpec {
            at: s.into(),
            max_rate: None,
        }
    }

    fn zoned(tz: &TimeZone, s: &str) -> Zoned {
        s.parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(tz.clone())
            .unwrap()
    }

    fn firmware_only(list: Vec<WindowSpec>) -> Schedule {
        Schedule::new(&SyncWindows {
            firmware: ClassWindows::Windows(list),
            ..SyncWindows::default()
        })
    }

    #[test]
    fn window_crossing_midnight_is_open_late_and_early_only() {
        let s = firmware_only(vec![at("22:00-06:00")]);
        let tz = TimeZone::UTC;
        for (t, open) in [
            ("2026-06-01T21:59:59", false),
            ("2026-06-01T22:00", true),
            ("2026-06-01T23:59", true),
            ("2026-06-02T00:00", true),
            ("2026-06-02T05:59:59", true),
            ("2026-06-02T06:00", false),
            ("2026-06-02T12:00", false),
        ] {
            assert_eq!(s.open(FileClass::Firmware, &zoned(&tz, t)), open, "{t}");
            assert!(
                s.open(FileClass::Config, &zoned(&tz, t)),
                "config is always"
            );
        }
    }

    #[test]
    fn rate_inside_a_window_and_outside() {
        let s = firmware_only(vec![WindowSpec {
            at: "22:00-06:00".into(),
            max_rate: Some(0),
        }]);
        let tz = TimeZone::UTC;
        assert_eq!(
            s.rate(&zoned(&tz, "2026-06-01T12:00"), 2_000_000),
            2_000_000
        );
        assert_eq!(s.rate(&zoned(&tz, "2026-06-01T23:00"), 2_000_000), 0);
        let strict = Schedule::new(&SyncWindows {
            firmware: ClassWindows::Windows(vec![WindowSpec {
                at: "22:00-06:00".into(),
                max_rate: Some(0),
            }]),
            locale: ClassWindows::Windows(vec![WindowSpec {
                at: "23:00-23:30".into(),
                max_rate: Some(1_000_000),
            }]),
            ..SyncWindows::default()
        });
        assert_eq!(strict.rate(&zoned(&tz, "2026-06-01T23:10"), 0), 1_000_000);
        assert_eq!(strict.rate(&zoned(&tz, "2026-06-01T23:40"), 5), 0);
    }

    #[test]
    fn malformed_and_overlapping_windows_are_refused() {
        for bad in [
            "22:00",
            "25:00-01:00",
            "10:00-10:00",
            "9-10",
            "10:00-11:0x",
            "24:00-01:00",
        ] {
            assert!(
                class_windows(&ClassWindows::Windows(vec![at(bad)])).is_err(),
                "{bad}"
            );
        }
        let e = class_windows(&ClassWindows::Windows(vec![
            at("22:00-06:00"),
            at("05:00-07:00"),
        ]))
        .unwrap_err();
        assert_eq!(e.0, 1);
        assert!(e.1.contains("overlaps `22:00-06:00`"), "{}", e.1);
        // 12:00-24:00 overlaps 22:00-06:00 before midnight; windows that only touch do not.
        assert!(class_windows(&ClassWindows::Windows(vec![
            at("22:00-06:00"),
            at("06:00-07:00"),
            at("12:00-24:00")
        ]))
        .is_err());
        assert!(class_windows(&ClassWindows::Windows(vec![
            at("22:00-06:00"),
            at("06:00-07:00"),
            at("12:00-13:00")
        ]))
        .is_ok());
    }

    #[test]
    fn next_change_is_the_next_edge_even_across_midnight() {
        let s = firmware_only(vec![at("22:00-06:00")]);
        let tz = TimeZone::UTC;
        let n = s.next_change(&zoned(&tz, "2026-06-01T12:00")).unwrap();
        assert_eq!(n.datetime().to_string(), "2026-06-01T22:00:00");
        let n = s.next_change(&zoned(&tz, "2026-06-01T23:00")).unwrap();
        assert_eq!(n.datetime().to_string(), "2026-06-02T06:00:00");
        assert!(Schedule::default()
            .next_change(&zoned(&tz, "2026-06-01T23:00"))
            .is_none());
    }

    #[test]
    fn dst_spring_forward_and_fall_back() {
        // US Eastern: 2026-03-08 02:00 EST jumps to 03:00 EDT; 2026-11-01 02:00 EDT goes back
        // to 01:00 EST.
        let tz = TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap();
        let s = firmware_only(vec![at("01:00-03:00")]);
        let before = zoned(&tz, "2026-03-08T00:30");
        assert_eq!(
            s.next_change(&before).unwrap().datetime().to_string(),
            "2026-03-08T01:00:00"
        );
        // One real hour after 01:30 EST the wall clock reads 03:30 EDT: closed. The window
        // was one hour long that night.
        let inside = zoned(&tz, "2026-03-08T01:30");
        assert!(s.open(FileClass::Firmware, &inside));
        let later = inside.checked_add(1.hour()).unwrap();
        assert_eq!(later.datetime().to_string(), "2026-03-08T03:30:00");
        assert!(!s.open(FileClass::Firmware, &later));
        // The close at 03:00 wall time is 02:00 EST's gap: the next change from 01:30 EST is
        // the first instant after the gap.
        assert_eq!(
            s.next_change(&inside).unwrap().timestamp(),
            zoned(&tz, "2026-03-08T03:00").timestamp()
        );

        // Fall back: 01:00-02:00 happens twice; the window is open both times.
        let s = firmware_only(vec![at("01:00-02:00")]);
        let first = zoned(&tz, "2026-11-01T01:30");
        let second = first.checked_add(1.hour()).unwrap();
        assert_eq!(second.datetime().to_string(), "2026-11-01T01:30:00");
        assert!(s.open(FileClass::Firmware, &first));
        assert!(s.open(FileClass::Firmware, &second));
        let after = second.checked_add(1.hour()).unwrap();
        assert!(!s.open(FileClass::Firmware, &after));
    }
}
