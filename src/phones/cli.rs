//! `branchtftp phones [--admin URL] [--json] [--stuck]`: the phones a running appliance has seen,
//! as a table (or its `GET /phones` JSON).

use std::fmt::Write;
use std::time::Duration;

use super::{PhoneReport, PhoneState};
use crate::admin::client::{print, AdminClient};
use crate::cache::cli::{human_age, human_size};

/// Runs the command; returns the exit code: 0, or 1 when the appliance cannot be asked.
pub async fn run(admin: &str, json: bool, stuck_only: bool) -> i32 {
    let phones: Vec<PhoneReport> = match AdminClient::new(admin, None, Duration::from_secs(10)) {
        Ok(c) => match c.get_json("/phones").await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("branchtftp phones: {e}");
                return 1;
            }
        },
        Err(e) => {
            eprintln!("branchtftp phones: {e}");
            return 1;
        }
    };
    let phones: Vec<PhoneReport> = phones
        .into_iter()
        .filter(|p| !stuck_only || p.state == PhoneState::Stuck)
        .collect();
    if json {
        print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&phones).expect("reports serialize")
        ));
    } else {
        print(&render(&phones, crate::cache::now_millis() / 1000));
    }
    0
}

fn state_name(s: PhoneState) -> &'static str {
    match s {
        PhoneState::Seen => "seen",
        PhoneState::Booting => "booting",
        PhoneState::Upgrading => "upgrading",
        PhoneState::Booted => "booted",
        PhoneState::Stuck => "stuck",
    }
}

/// `3 of 5 files, 12.0 MiB of 28.1 MiB`, or `-` when the last boot fetched no firmware.
fn firmware_progress(p: &PhoneReport) -> String {
    if p.firmware.is_empty() {
        return "-".into();
    }
    let done = p.firmware.iter().filter(|f| f.complete).count();
    let bytes: u64 = p.firmware.iter().map(|f| f.bytes).sum();
    let total: u64 = p.firmware.iter().map(|f| f.total.unwrap_or(f.bytes)).sum();
    format!(
        "{done}/{} files, {} of {}",
        p.firmware.len(),
        human_size(bytes),
        human_size(total)
    )
}

/// The table: one phone a line.
pub fn render(phones: &[PhoneReport], now: u64) -> String {
    let rows: Vec<[String; 8]> = phones
        .iter()
        .map(|p| {
            [
                p.mac.clone(),
                p.address.to_string(),
                state_name(p.state).to_string(),
                p.load.clone().unwrap_or_else(|| "-".into()),
                p.last_boot
                    .map(|t| format!("{} ago", human_age(now.saturating_sub(t) * 1000)))
                    .unwrap_or_else(|| "-".into()),
                p.last_complete_boot
                    .as_ref()
                    .map(|b| format!("{:.1}s", b.seconds))
                    .unwrap_or_else(|| "-".into()),
                firmware_progress(p),
                p.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = [
        "MAC",
        "ADDRESS",
        "STATE",
        "LOAD",
        "LAST BOOT",
        "BOOT TIME",
        "FIRMWARE",
        "LAST ERROR",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 8]| {
        let mut s = String::new();
        for (c, w) in cells.iter().zip(widths) {
            let _ = write!(s, "{c:<w$}  ");
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(header);
    for r in &rows {
        line(r.each_ref().map(String::as_str));
    }
    let stuck = phones
        .iter()
        .filter(|p| p.state == PhoneState::Stuck)
        .count();
    let _ = writeln!(out, "{} phones, {stuck} stuck", phones.len());
    out
}
