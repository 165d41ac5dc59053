//! The open-file limit (`RLIMIT_NOFILE`) checked against the configured
//! connection limits at start-up (see `docs/security.md`, "File
//! descriptors").
//!
//! Every SMTP session and every outbound delivery holds a socket; the
//! spool, Redis, DNS, the admin API and the logs need more. A node whose
//! limits cannot fit runs out of descriptors under load, and then
//! `accept()` fails for everyone. So the node raises its soft limit to the
//! hard limit (the usual soft limit of 1,024 is a relic; the hard limit is
//! what the operator granted) and refuses to start when the configuration
//! still cannot fit.

/// Descriptors kept for everything but client and delivery sockets: the
/// listening sockets, spool files being written, Redis connections, DNS
/// sockets, the admin API and its clients, log files, the runtime's own.
pub const MARGIN: u64 = 100;

/// The soft and hard `RLIMIT_NOFILE` after the soft limit was raised as far
/// as the hard limit allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit to the hard limit. When that fails (a hard limit
/// the kernel refuses as a soft one), the current limit stays.
pub fn raise_nofile() -> std::io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Ok(NofileLimit {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Checks that `smtp_connections` client sessions plus `delivery_connections`
/// outbound connections plus [`MARGIN`] fit in `limit.soft`. The error
/// names the keys to change.
pub fn check(
    smtp_connections: usize,
    delivery_connections: usize,
    limit: NofileLimit,
) -> Result<(), String> {
    let needed = (smtp_connections as u64)
        .saturating_add(delivery_connections as u64)
        .saturating_add(MARGIN);
    if needed <= limit.soft {
        return Ok(());
    }
    Err(format!(
        "smtp.max_connections ({smtp_connections}) + delivery.max_connections \
         ({delivery_connections}) + {MARGIN} for the spool, Redis, DNS and the admin API \
         need {needed} open files, but the open-file limit (RLIMIT_NOFILE) is {} (hard \
         limit {}): lower smtp.max_connections or delivery.max_connections, or raise the \
         limit (ulimit -n, systemd LimitNOFILE=, a container's nofile ulimit)",
        limit.soft, limit.hard
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_fit_and_limits_that_do_not() {
        let limit = |soft, hard| NofileLimit { soft, hard };
        // (smtp, delivery, limit, fits)
        let cases = [
            (1000, 500, limit(1024, 1024), false),
            (1000, 500, limit(1600, 1600), true),
            (1000, 500, limit(1599, 4096), false),
            (1000, 500, limit(1_048_576, 1_048_576), true),
            (20, 4, limit(124, 124), true),
            (usize::MAX, usize::MAX, limit(u64::MAX - 1, u64::MAX), false),
        ];
        for (smtp, delivery, limit, fits) in cases {
            assert_eq!(
                check(smtp, delivery, limit).is_ok(),
                fits,
                "{smtp} + {delivery} in {limit:?}"
            );
        }
        let err = check(1000, 500, limit(1024, 1024)).unwrap_err();
        assert!(err.starts_with("smtp.max_connections (1000) + delivery.max_connections (500)"));
        assert!(err.contains("need 1600 open files"), "{err}");
        assert!(err.contains("is 1024 (hard limit 1024)"), "{err}");
    }

    #[test]
    fn raising_keeps_the_soft_limit_at_most_the_hard_limit() {
        let limit = raise_nofile().expect("getrlimit works");
        assert!(limit.soft <= limit.hard);
        assert!(limit.soft > 0);
    }
}
