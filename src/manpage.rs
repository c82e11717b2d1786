//! The `branchtftp(1)` man page, generated from the command-line definition with clap_mangen so
//! it never drifts from `--help`, plus the sections a Debian user looks for: every command with its
//! options, FILES, ENVIRONMENT, SIGNALS, EXIT STATUS. `branchtftp man` prints it; packaging
//! gzips it into `/usr/share/man/man1/branchtftp.1.gz`.

use std::io::{self, Write};

use clap::Command;
use roff::{bold, italic, roman, Roff};

/// Writes the whole page for `cmd` (the binary's top-level command) as roff.
pub fn render(cmd: &Command, out: &mut dyn Write) -> io::Result<()> {
    // Building fills in what the derive leaves implicit (value counts, help flags).
    let mut cmd = cmd.clone();
    cmd.build();
    let cmd = &cmd;
    let man = clap_mangen::Man::new(cmd.clone()).manual("branchtftp manual");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;

    let mut page = Roff::new();
    page.control("SH", ["COMMANDS"]);
    // `help` is clap's own; the page is the help.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        command_section(&mut page, cmd.get_name(), sub);
    }
    extra_sections(&mut page);
    page.to_writer(out)?;

    if cmd.get_version().is_some() {
        man.render_version_section(out)?;
    }
    Ok(())
}

/// One `.SS` per command: its usage line, its long description, each option as a tagged paragraph.
fn command_section(page: &mut Roff, bin: &str, sub: &Command) {
    let mut usage = format!("{bin} {}", sub.get_name());
    for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
        if arg.is_positional() {
            let name = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map(|n| n.to_string())
                .unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
            usage.push_str(&format!(" {name}"));
        }
    }
    if sub
        .get_arguments()
        .any(|a| !a.is_positional() && !a.is_hide_set())
    {
        usage.push_str(" [OPTIONS]");
    }
    if sub.has_subcommands() {
        usage.push_str(" COMMAND");
    }
    page.control("SS", [usage.as_str()]);
    if let Some(about) = sub.get_long_about().or(sub.get_about()) {
        page.text([roman(about.to_string())]);
    }
    for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let mut tag = Vec::new();
        if let Some(s) = arg.get_short() {
            tag.push(bold(format!("-{s}")));
        }
        if let Some(l) = arg.get_long() {
            if !tag.is_empty() {
                tag.push(roman(", "));
            }
            tag.push(bold(format!("--{l}")));
        }
        let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
        if let Some(names) = arg.get_value_names() {
            if takes_value || arg.is_positional() {
                if !tag.is_empty() {
                    tag.push(roman(" "));
                }
                let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                tag.push(italic(names.join(" ")));
            }
        } else if arg.is_positional() {
            tag.push(italic(id.to_uppercase()));
        }
        page.control("TP", []);
        page.text(tag);
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        page.text([roman(help)]);
    }
    for nested in sub
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        command_section(page, &format!("{bin} {}", sub.get_name()), nested);
    }
}

/// What each alert of deploy/prometheus/rules/branchtftp.rules.yml means and what to do; the
/// alerts' `runbook` annotations point here.
const ALERT_RUNBOOKS: [(&str, &str); 6] = [
    ("BranchtftpDown", "Prometheus cannot scrape the appliance. Check the host is up, `systemctl status branchtftp` and `journalctl -u branchtftp`, and that admin.listen is reachable from Prometheus (a management address, not 127.0.0.1). Phones cannot boot from a branch whose appliance is down; DHCP option 150 may list the central server second."),
    ("BranchtftpUpstreamDown", "An upstream has not answered for 10 minutes. Phones are still served from the cache; misses and the sync worker fall through to the next upstream. Run `branchtftp status` on the box for the upstream's last error, then check the WAN link and the central server."),
    ("BranchtftpCacheNearlyFull", "The cache is over 90 % of cache.max_size: least recently used files are evicted and may come back over the WAN. Raise cache.max_size if the disk allows, or remove stale firmware with `branchtftp cache ls` and `branchtftp cache evict NAME`."),
    ("BranchtftpSyncFailing", "Three sync passes failed and none succeeded in 20 minutes: configs and firmware at the branch are getting stale. `branchtftp status` shows the last pass's result; the journal names the files and upstream errors."),
    ("BranchtftpTransferFailures", "More than 5 % of requests failed over 15 minutes: the server is busy (access.max_transfers, access.max_per_client), upstreams fail on misses, or clients are cut off. The journal logs every failed transfer with its client and reason."),
    ("BranchtftpPhonesStuck", "Phones whose last boot did not finish or whose firmware download stopped. `branchtftp phones --stuck` lists them with the file and byte offset where they stopped and their last error; power-cycle the phone after fixing the cause (a missing image, a link dropping large transfers)."),
];

fn extra_sections(page: &mut Roff) {
    page.control("SH", ["ADMIN ENDPOINT"]);
    page.text([roman(
        "admin.listen serves GET /healthz, /status, /metrics, /phones and /cache to whoever reaches \
         it, so it may be a management address a fleet's Prometheus scrapes. Calls that change state \
         (POST /sync, POST /cache/verify, DELETE /cache/NAME) are refused with 403 unless they come \
         from loopback (127.0.0.0/8, ::1) or carry Authorization: Bearer TOKEN, where TOKEN is the \
         content of admin.token_file. The token file must be owned by the service user and readable \
         by it alone (chmod 600); serve refuses to start with a token others can read. The cache \
         commands send the token when they can read the file.",
    )]);

    page.control("SH", ["FLEET ALERTS"]);
    page.text([roman(
        "The alert rules in /usr/share/doc/branchtftp/prometheus (deploy/prometheus in the source) \
         point their runbook annotation at these entries.",
    )]);
    for (alert, what) in ALERT_RUNBOOKS {
        page.control("TP", []);
        page.text([bold(alert)]);
        page.text([roman(what)]);
    }

    page.control("SH", ["CONFIGURATION"]);
    page.text([
        roman(
            "The configuration is one YAML file. It is looked up as: the -c option, else \
         $BRANCHTFTP_CONFIG, else /etc/branchtftp/branchtftp.yaml if it exists, else the embedded \
         defaults. Every option of the packaged file is commented with its default and the reason \
         for it. Unknown keys are errors. Durations are written 500ms, 15m, 24h; sizes 20GiB, \
         500MB; addresses IP:PORT. Check a file with ",
        ),
        bold("branchtftp check-config -c FILE"),
        roman(
            ", which prints the effective configuration, or every problem as FILE:LINE:COL: key: \
             problem.",
        ),
    ]);

    page.control("SH", ["FILES"]);
    for (file, what) in [
        (
            "/etc/branchtftp/branchtftp.yaml",
            "The configuration (a conffile: upgrades keep your edits).",
        ),
        (
            "/etc/branchtftp/overrides/",
            "Local files that win over upstream copies, served as they are.",
        ),
        (
            "/var/lib/branchtftp/",
            "The cache, owned by the branchtftp user. Removed on purge only.",
        ),
        (
            "/lib/systemd/system/branchtftp.service",
            "The hardened systemd unit.",
        ),
    ] {
        page.control("TP", []);
        page.text([italic(file)]);
        page.text([roman(what)]);
    }

    page.control("SH", ["ENVIRONMENT"]);
    for (var, what) in [
        (
            "BRANCHTFTP_CONFIG",
            "Configuration file used when -c is not given.",
        ),
        (
            "RUST_LOG",
            "Log filter (e.g. branchtftp=debug); overrides the log key of the configuration.",
        ),
    ] {
        page.control("TP", []);
        page.text([bold(var)]);
        page.text([roman(what)]);
    }

    page.control("SH", ["SIGNALS"]);
    for (sig, what) in [
        ("SIGHUP", "Reload the configuration (systemctl reload branchtftp). An invalid file is reported and the running configuration kept."),
        ("SIGTERM, SIGINT", "Finish the transfers in flight (bounded wait), then exit 0."),
    ] {
        page.control("TP", []);
        page.text([bold(sig)]);
        page.text([roman(what)]);
    }

    page.control("SH", ["EXIT STATUS"]);
    for (code, what) in [
        ("0", "Success; for check-config, a valid configuration."),
        ("1", "Failure at run time (e.g. an address could not be bound; sync --once could not reach the central server)."),
        ("2", "Invalid configuration or command line."),
    ] {
        page.control("TP", []);
        page.text([bold(code)]);
        page.text([roman(what)]);
    }

    page.control("SH", ["SEE ALSO"]);
    page.text([roman(
        "in.tftpd(8), tftp(1), systemctl(1), journalctl(1), RFC 1350, RFC 2347, RFC 2348, \
         RFC 2349, RFC 7440",
    )]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_lists_hidden_free_commands_and_files() {
        let cmd = Command::new("branchtftp")
            .about("Caching branch TFTP appliance")
            .subcommand(
                Command::new("check-config").about("Validate").arg(
                    clap::Arg::new("config")
                        .short('c')
                        .long("config")
                        .value_name("FILE")
                        .help("Configuration file"),
                ),
            )
            .subcommand(Command::new("man").hide(true));
        let mut out = Vec::new();
        render(&cmd, &mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        assert!(page.starts_with(".ie"), "{page}");
        assert!(
            page.contains(".SS \"branchtftp check-config [OPTIONS]\""),
            "{page}"
        );
        assert!(
            page.contains("\\fB\\-c\\fR, \\fB\\-\\-config\\fR \\fIFILE\\fR"),
            "{page}"
        );
        assert!(page.contains("/etc/branchtftp/branchtftp.yaml"));
        assert!(!page.contains(".SS \"branchtftp man\""));
    }
}
