//! Passwords for SMTP AUTH and tokens for the admin API: argon2id hashes in
//! PHC form, the user table and the operator table that check them.
//!
//! `smarthost hash-password` writes the hashes that `[[smtp.users]]` and
//! `[[admin.operators]]` hold; the clear secret is never stored.

use std::collections::HashMap;
use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params};

use crate::config::{AdminOperator, OperatorRole, SmtpUser};

/// Hashes a password with argon2id (the crate's default cost: 19 MiB, two
/// passes) and a random 16-byte salt, as a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub fn hash_password(secret: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("the default argon2 parameters accept any password")
        .to_string()
}

/// Whether `secret` matches the argon2 PHC string `phc`. The cost parameters
/// are taken from the hash. A malformed hash matches nothing.
pub fn verify_password(phc: &str, secret: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) if Algorithm::try_from(hash.algorithm).is_ok() => Argon2::default()
            .verify_password(secret.as_bytes(), &hash)
            .is_ok(),
        _ => false,
    }
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
    Params::try_from(&hash).map_err(|e| format!("bad argon2 parameters ({e}); {HINT}"))?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(format!("the salt or the hash is missing; {HINT}"));
    }
    Ok(())
}

/// The users that may authenticate, from `[[smtp.users]]`.
pub struct UserDb {
    users: HashMap<String, String>,
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
            decoy: hash_password(&String::from_utf8_lossy(&rand::random::<[u8; 16]>())),
        }
    }

    /// Whether `user` exists and `password` is theirs. An unknown user costs
    /// one argon2 verification, like a known one whose hash has the default
    /// cost.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(phc) => verify_password(phc, password),
            None => {
                let _ = verify_password(&self.decoy, password);
                false
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
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
    /// Changes something (`POST`).
    Write,
}

impl OperatorRole {
    /// Whether an operator with this role may make a request of this kind.
    pub fn allows(self, access: Access) -> bool {
        match (self, access) {
            (OperatorRole::Admin, _) => true,
            (OperatorRole::Viewer, Access::Read) => true,
            (OperatorRole::Viewer, Access::Write) => false,
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
        let mut found = None;
        for (operator, phc) in &self.operators {
            if verify_password(phc, token) && found.is_none() {
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
        }]);
        assert!(db.verify("app", "pw"));
        assert!(!db.verify("app", "wrong"));
        assert!(!db.verify("App", "pw"));
        assert!(!db.verify("nobody", "pw"));
        assert!(!format!("{db:?}").contains("argon2"));
    }

    #[test]
    fn viewers_read_and_admins_also_write() {
        assert!(OperatorRole::Admin.allows(Access::Read));
        assert!(OperatorRole::Admin.allows(Access::Write));
        assert!(OperatorRole::Viewer.allows(Access::Read));
        assert!(!OperatorRole::Viewer.allows(Access::Write));
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
