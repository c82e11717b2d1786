//! Reading a running appliance's admin endpoint: `/status`, `/metrics` samples.

use std::net::SocketAddr;

/// `GET http://ADMIN/PATH` as text.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    reqwest::get(format!("http://{admin}{path}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of a Prometheus sample whose labels include every `(key, value)` given, summed
/// over the samples that match; 0 when absent.
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
