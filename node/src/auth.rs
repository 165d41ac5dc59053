//! Passwords for SMTP AUTH: argon2id hashes in PHC form, and the user table
//! that checks them.
//!
//! `smarthost hash-password` writes the hashes that `[[smtp.users]]` holds;
//! the clear password is never stored.

use std::collections::HashMap;
use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params};

use crate::config::SmtpUser;

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
}
