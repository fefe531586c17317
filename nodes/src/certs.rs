//! Key material for TLS: a site CA and one certificate per node or device (rcgen, ECDSA
//! P-256), for mutual TLS on Zenoh links and TLS on gRPC.
//!
//! `init` writes `ca.pem` and `ca.key`; `issue NAME` writes `NAME.pem` and `NAME.key`
//! signed by that CA, with `CN = NAME` (the subject Zenoh access control matches) and the
//! given names and addresses as subject alternative names. Private keys are written with
//! mode 0600 and never printed; nothing is overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

fn write_new(path: &Path, content: &str, private: bool) -> crate::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = o
        .open(path)
        .map_err(|e| crate::Error::config(format!("cannot create {}: {e}", path.display())))?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(days.into());
}

/// Creates `dir/ca.pem` and `dir/ca.key`.
pub fn init_ca(dir: &Path, name: &str, days: u32) -> crate::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::config(format!("cannot create {}: {e}", dir.display())))?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "twinmesh");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&dir.join("ca.key"), &key.serialize_pem(), true)?;
    write_new(&dir.join("ca.pem"), &cert.pem(), false)?;
    Ok(())
}

/// Issues `dir/{name}.pem` and `dir/{name}.key`; returns their paths.
pub fn issue(
    dir: &Path,
    name: &str,
    sans: &[String],
    days: u32,
) -> crate::Result<(PathBuf, PathBuf)> {
    if !twinmesh_twins::id::is_valid_segment(name) {
        return Err(crate::Error::config(format!(
            "invalid certificate name {name:?}: expected [a-z0-9][a-z0-9_-]{{0,62}}"
        )));
    }
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).map_err(|e| {
            crate::Error::config(format!(
                "cannot read {} (run `twinmesh certs init --dir {}` first): {e}",
                p.display(),
                dir.display()
            ))
        })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)
        .map_err(|e| crate::Error::config(format!("invalid CA key in {}: {e}", dir.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key).map_err(|e| {
        crate::Error::config(format!("invalid CA certificate in {}: {e}", dir.display()))
    })?;
    let mut names: Vec<String> = if sans.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    } else {
        sans.to_vec()
    };
    if !names.iter().any(|n| n == name) {
        names.push(name.to_owned());
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for n in &names {
        params
            .subject_alt_names
            .push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|e| crate::Error::config(format!("invalid name {n:?}: {e}")))?,
                ),
            });
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "twinmesh");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certificates() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA", 30).unwrap();
        assert!(
            init_ca(dir.path(), "test CA", 30).is_err(),
            "overwrote a CA"
        );
        let (cert, key) = issue(dir.path(), "edge-a", &[], 30).unwrap();
        let pem = std::fs::read_to_string(&cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let parsed = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1;
        let x = parsed.parse_x509().unwrap();
        assert_eq!(
            x.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "edge-a"
        );
        assert_eq!(
            x.issuer()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "test CA"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            issue(dir.path(), "edge-a", &[], 30).is_err(),
            "overwrote a cert"
        );
        assert!(issue(dir.path(), "Bad Name", &[], 30).is_err());
        let other = tempfile::tempdir().unwrap();
        let e = issue(other.path(), "x", &[], 30).unwrap_err().to_string();
        assert!(e.contains("certs init"), "{e}");
    }
}
