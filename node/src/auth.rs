//! Passwords for SMTP AUTH and tokens for the admin API: argon2id hashes in
//! PHC form, the user table and the operator table that check them.
//!
//! `smarthost hash-password` writes the hashes that `[[smtp.users]]` and
//! `[[admin.operators]]` hold; the clear secret is never stored.
//!
//! A check fills `m` KiB of argon2 memory. The checks of a running node
//! use [`Memory`] areas that [`crate::auth_guard::PasswordChecks`] hands
//! out and takes back, so the memory they need is allocated once per
//! concurrent check and reused, never once per thread of the blocking pool
//! (the allocator keeps what a thread used, and a flood of logins grew the
//! process by gigabytes that way). Hashes whose cost would make one check
//! too dear are refused at load ([`check_password_hash`]).

use std::collections::HashMap;
use std::fmt;

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use smarthost_proto::address::SenderRule;

use crate::config::{AdminOperator, OperatorRole, SmtpUser};
use crate::quota::Quota;

/// The most memory one check may use: 64 MiB (`m=65536`). Every
/// concurrent check holds this much at worst; the hashes that
/// `smarthost hash-password` writes use 19 MiB.
pub const MAX_HASH_MEMORY_KIB: u32 = 64 * 1024;
/// The most passes over the memory one check may make (CPU per check).
pub const MAX_HASH_PASSES: u32 = 8;
/// The most lanes; this build computes them one after the other.
pub const MAX_HASH_LANES: u32 = 4;

/// The argon2 memory of one check, kept between checks so that it is
/// allocated once and reused. It grows to the largest cost it has served.
#[derive(Default)]
pub struct Memory(Vec<Block>);

impl Memory {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.len() * Block::SIZE
    }

    fn blocks(&mut self, count: usize) -> &mut [Block] {
        if self.0.len() < count {
            self.0.resize(count, Block::default());
        }
        &mut self.0[..count]
    }
}

/// Hashes a password with argon2id (the crate's default cost: 19 MiB, two
/// passes, one lane, which OWASP recommends as the least for argon2id) and
/// a random 16-byte salt, as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub fn hash_password(secret: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("the default argon2 parameters accept any password")
        .to_string()
}

/// Whether `secret` matches the argon2 PHC string `phc`. The cost parameters
/// are taken from the hash. A malformed hash matches nothing. Allocates its
/// own memory: a running node uses [`verify_password_in`].
pub fn verify_password(phc: &str, secret: &str) -> bool {
    verify_password_in(phc, secret, &mut Memory::default())
}

/// [`verify_password`] in the given memory, which grows if it must.
pub fn verify_password_in(phc: &str, secret: &str, memory: &mut Memory) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) =
        (Algorithm::try_from(hash.algorithm), Params::try_from(&hash))
    else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let blocks = memory.blocks(params.block_count());
    let mut out = vec![0u8; expected.len()];
    if Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(secret.as_bytes(), salt, &mut out, blocks)
        .is_err()
    {
        return false;
    }
    // `Output` compares in constant time.
    Output::new(&out).is_ok_and(|computed| computed == expected)
}

/// Checks that `phc` is an argon2 hash in PHC form that
/// [`verify_password`] can use; the error says what is wrong.
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    const HINT: &str = "make one with `smarthost hash-password`";
    let hash =
        PasswordHash::new(phc).map_err(|e| format!("not an argon2 PHC string ({e}); {HINT}"))?;
    Algorithm::try_from(hash.algorithm).map_err(|_| {
        format!(
            "algorithm `{}` is not argon2id, argon2i or argon2d; {HINT}",
            hash.algorithm
        )
    })?;
    let params =
        Params::try_from(&hash).map_err(|e| format!("bad argon2 parameters ({e}); {HINT}"))?;
    if params.m_cost() > MAX_HASH_MEMORY_KIB {
        return Err(format!(
            "the memory cost m={} KiB is above the {MAX_HASH_MEMORY_KIB} KiB (64 MiB) \
             that one check may use; {HINT}",
            params.m_cost()
        ));
    }
    if params.t_cost() > MAX_HASH_PASSES {
        return Err(format!(
            "the time cost t={} is above the {MAX_HASH_PASSES} passes that one check may make; {HINT}",
            params.t_cost()
        ));
    }
    if params.p_cost() > MAX_HASH_LANES {
        return Err(format!(
            "the parallelism p={} is above {MAX_HASH_LANES}; {HINT}",
            params.p_cost()
        ));
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(format!("the salt or the hash is missing; {HINT}"));
    }
    Ok(())
}

/// The users that may authenticate, from `[[smtp.users]]`.
pub struct UserDb {
    users: HashMap<String, String>,
    /// The senders of users limited to some (`senders` in the config).
    senders: HashMap<String, Vec<SenderRule>>,
    /// The quotas of users that have some.
    quotas: HashMap<String, Vec<Quota>>,
    /// Checked against for unknown user names, so that they cost the same
    /// argon2 work as known ones and a client cannot tell them apart by the
    /// reply time.
    decoy: String,
}

impl UserDb {
    pub fn new(users: &[SmtpUser]) -> Self {
        UserDb {
            users: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            senders: users
                .iter()
                .filter(|u| !u.senders.is_empty())
                .map(|u| (u.name.clone(), SenderRule::parse_list(&u.senders)))
                .collect(),
            quotas: users
                .iter()
                .map(|u| {
                    let quotas = Quota::list(u.messages_per_minute, u.messages_per_day);
                    (u.name.clone(), quotas)
                })
                .filter(|(_, quotas)| !quotas.is_empty())
                .collect(),
            decoy: decoy_hash(users.iter().map(|u| u.password_hash.as_str())),
        }
    }

    /// Whether `user` exists and `password` is theirs. An unknown user costs
    /// one argon2 verification, like a known one. Allocates its own memory:
    /// a running node uses [`UserDb::verify_in`].
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.verify_in(user, password, &mut Memory::default())
    }

    /// [`UserDb::verify`] in the given memory.
    pub fn verify_in(&self, user: &str, password: &str, memory: &mut Memory) -> bool {
        match self.users.get(user) {
            Some(phc) => verify_password_in(phc, password, memory),
            None => {
                let _ = verify_password_in(&self.decoy, password, memory);
                false
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The senders `user` may use, if limited to some.
    pub fn senders_of(&self, user: &str) -> Option<&[SenderRule]> {
        self.senders.get(user).map(Vec::as_slice)
    }

    /// The sending quotas of `user` (none: no limit).
    pub fn quotas_of(&self, user: &str) -> &[Quota] {
        self.quotas.get(user).map_or(&[], Vec::as_slice)
    }
}

/// A hash of a random secret with the cost of the dearest of `hashes` (the
/// default cost when there are none), so that checking an unknown user
/// takes as long as checking the slowest known one.
fn decoy_hash<'a>(hashes: impl Iterator<Item = &'a str>) -> String {
    let params = hashes
        .filter_map(|phc| {
            let hash = PasswordHash::new(phc).ok()?;
            Params::try_from(&hash).ok()
        })
        .max_by_key(|p| u64::from(p.m_cost()) * u64::from(p.t_cost()))
        .and_then(|p| Params::new(p.m_cost(), p.t_cost(), p.p_cost(), None).ok())
        .unwrap_or_default();
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .expect("16 bytes is a valid salt length");
    let secret: [u8; 16] = rand::random();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(&secret, &salt)
        .expect("parameters of a valid hash")
        .to_string()
}

/// Lists the user names only, never the hashes.
impl fmt::Debug for UserDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.users.keys().collect();
        names.sort();
        f.debug_struct("UserDb").field("users", &names).finish()
    }
}

/// What an admin API request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Looks (`GET`).
    Read,
    /// Changes the mail (`POST`, `DELETE`): operators and admins.
    Write,
    /// Drops what no report can name: admins only.
    Admin,
}

impl OperatorRole {
    /// Whether an operator with this role may make a request of this kind.
    pub fn allows(self, access: Access) -> bool {
        match (self, access) {
            (OperatorRole::Admin, _) => true,
            (OperatorRole::Operator, Access::Read | Access::Write) => true,
            (OperatorRole::Operator, Access::Admin) => false,
            (OperatorRole::Viewer, Access::Read) => true,
            (OperatorRole::Viewer, Access::Write | Access::Admin) => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OperatorRole::Admin => "admin",
            OperatorRole::Operator => "operator",
            OperatorRole::Viewer => "viewer",
        }
    }
}

/// An operator a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: OperatorRole,
}

/// The operators that may use the admin API, from `[[admin.operators]]`.
/// Holds hashes only; a token is checked and then forgotten.
pub struct OperatorDb {
    operators: Vec<(Operator, String)>,
}

impl OperatorDb {
    pub fn new(operators: &[AdminOperator]) -> Self {
        OperatorDb {
            operators: operators
                .iter()
                .map(|o| {
                    let operator = Operator {
                        name: o.name.clone(),
                        role: o.role,
                    };
                    (operator, o.token_hash.clone())
                })
                .collect(),
        }
    }

    /// No operator configured: the API asks for no token.
    pub fn is_empty(&self) -> bool {
        self.operators.is_empty()
    }

    /// The operator whose token this is. Every hash is checked whichever
    /// matches, so the time taken does not tell which one did: one argon2
    /// verification per operator. Blocking; call it off the async threads.
    pub fn identify(&self, token: &str) -> Option<Operator> {
        self.identify_in(token, &mut Memory::default())
    }

    /// [`OperatorDb::identify`] in the given memory.
    pub fn identify_in(&self, token: &str, memory: &mut Memory) -> Option<Operator> {
        let mut found = None;
        for (operator, phc) in &self.operators {
            if verify_password_in(phc, token, memory) && found.is_none() {
                found = Some(operator.clone());
            }
        }
        found
    }
}

/// Lists names and roles only, never the hashes.
impl fmt::Debug for OperatorDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let operators: Vec<&Operator> = self.operators.iter().map(|(o, _)| o).collect();
        f.debug_struct("OperatorDb")
            .field("operators", &operators)
            .finish()
    }
}

/// A hash with the smallest argon2 cost, so that tests in debug builds stay
/// fast; [`verify_password`] takes the cost from the hash.
#[cfg(test)]
pub(crate) fn cheap_hash(secret: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).unwrap();
    let params = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
    Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(secret.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let phc = hash_password("s3cret");
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        assert!(verify_password(&phc, "s3cret"));
        assert!(!verify_password(&phc, "s3cret "));
        assert!(!verify_password(&phc, ""));
        assert_eq!(check_password_hash(&phc), Ok(()));
    }

    #[test]
    fn the_same_password_gets_a_new_salt_each_time() {
        assert_ne!(hash_password("x"), hash_password("x"));
    }

    #[test]
    fn malformed_hashes_match_nothing_and_say_why() {
        for bad in [
            "",
            "plain",
            "$argon2id$v=19$m=19456,t=2,p=1",
            "$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA",
        ] {
            assert!(!verify_password(bad, "plain"), "{bad}");
            let err = check_password_hash(bad).unwrap_err();
            assert!(err.contains("hash-password"), "{bad}: {err}");
        }
    }

    #[test]
    fn user_db_checks_name_and_password() {
        let db = UserDb::new(&[SmtpUser {
            name: "app".to_string(),
            password_hash: hash_password("pw"),
            senders: Vec::new(),
            messages_per_minute: None,
            messages_per_day: None,
        }]);
        assert!(db.verify("app", "pw"));
        assert!(!db.verify("app", "wrong"));
        assert!(!db.verify("App", "pw"));
        assert!(!db.verify("nobody", "pw"));
        assert!(!format!("{db:?}").contains("argon2"));
    }

    #[test]
    fn one_memory_serves_hashes_of_every_cost() {
        let mut memory = Memory::default();
        let small = cheap_hash("a");
        assert!(verify_password_in(&small, "a", &mut memory));
        assert_eq!(memory.bytes(), 8 * 1024);
        let default = hash_password("b");
        assert!(verify_password_in(&default, "b", &mut memory));
        assert!(!verify_password_in(&default, "a", &mut memory));
        assert_eq!(memory.bytes(), 19456 * 1024);
        // It does not shrink: the next dear check allocates nothing.
        assert!(verify_password_in(&small, "a", &mut memory));
        assert_eq!(memory.bytes(), 19456 * 1024);
    }

    #[test]
    fn hashes_dearer_than_a_check_may_be_are_refused() {
        let with = |m, t, p| {
            let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
            // The hash itself is not computed: only its parameters matter.
            let params = Params::new(m, t, p, None).unwrap();
            let cheap = Params::new(Params::MIN_M_COST, 1, 1, None).unwrap();
            let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, cheap)
                .hash_password(b"x", &salt)
                .unwrap()
                .to_string();
            phc.replace(
                &format!("m={},t=1,p=1", Params::MIN_M_COST),
                &format!(
                    "m={},t={},p={}",
                    params.m_cost(),
                    params.t_cost(),
                    params.p_cost()
                ),
            )
        };
        assert_eq!(check_password_hash(&with(19456, 2, 1)), Ok(()));
        assert_eq!(check_password_hash(&with(65536, 8, 4)), Ok(()));
        for (phc, says) in [
            (with(65537, 2, 1), "m=65537 KiB is above the 65536 KiB"),
            (with(19456, 9, 1), "t=9 is above the 8 passes"),
            (with(19456, 2, 5), "p=5 is above 4"),
        ] {
            let err = check_password_hash(&phc).unwrap_err();
            assert!(err.contains(says), "{phc}: {err}");
            assert!(err.contains("hash-password"), "{err}");
        }
    }

    #[test]
    fn an_unknown_user_costs_what_the_dearest_known_one_does() {
        let db = UserDb::new(&[
            SmtpUser {
                name: "a".to_string(),
                password_hash: cheap_hash("pw"),
                senders: Vec::new(),
                messages_per_minute: None,
                messages_per_day: None,
            },
            SmtpUser {
                name: "b".to_string(),
                password_hash: hash_password("pw"),
                senders: Vec::new(),
                messages_per_minute: None,
                messages_per_day: None,
            },
        ]);
        let mut memory = Memory::default();
        assert!(!db.verify_in("nobody", "pw", &mut memory));
        assert_eq!(memory.bytes(), 19456 * 1024, "the decoy has b's cost");
        assert!(db.decoy.contains("m=19456,t=2,p=1"), "{}", db.decoy);
    }

    #[test]
    fn viewers_read_and_admins_also_write() {
        assert!(OperatorRole::Admin.allows(Access::Read));
        assert!(OperatorRole::Admin.allows(Access::Write));
        assert!(OperatorRole::Admin.allows(Access::Admin));
        assert!(OperatorRole::Operator.allows(Access::Read));
        assert!(OperatorRole::Operator.allows(Access::Write));
        assert!(!OperatorRole::Operator.allows(Access::Admin));
        assert!(OperatorRole::Viewer.allows(Access::Read));
        assert!(!OperatorRole::Viewer.allows(Access::Write));
        assert!(!OperatorRole::Viewer.allows(Access::Admin));
    }

    #[test]
    fn operator_db_finds_the_operator_of_a_token() {
        let operator = |name: &str, token: &str, role| AdminOperator {
            name: name.to_string(),
            token_hash: cheap_hash(token),
            role,
        };
        let db = OperatorDb::new(&[
            operator("ops", "admin-token", OperatorRole::Admin),
            operator("noc", "viewer-token", OperatorRole::Viewer),
        ]);
        assert!(!db.is_empty());
        assert_eq!(
            db.identify("admin-token"),
            Some(Operator {
                name: "ops".to_string(),
                role: OperatorRole::Admin
            })
        );
        assert_eq!(
            db.identify("viewer-token").map(|o| o.role),
            Some(OperatorRole::Viewer)
        );
        for wrong in ["", "admin-token ", "Admin-token", "ops", "viewer"] {
            assert_eq!(db.identify(wrong), None, "{wrong:?}");
        }
        assert!(!format!("{db:?}").contains("argon2"));
        assert!(OperatorDb::new(&[]).is_empty());
    }
}
