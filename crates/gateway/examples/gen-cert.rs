//! Writes a throwaway CA and a server certificate signed by it, for
//! benchmarks and trying out TLS: `DIR/ca.pem`, `DIR/cert.pem` (for
//! `127.0.0.1`, `::1` and `localhost`, plus any extra names given) and
//! `DIR/key.pem` (ECDSA P-256). Nothing here is for production.
//!
//! ```sh
//! cargo run --release -p muster-gateway --example gen-cert -- /tmp/certs [NAME...]
//! muster gateway --tls-cert /tmp/certs/cert.pem --tls-key /tmp/certs/key.pem ...
//! curl --cacert /tmp/certs/ca.pem https://127.0.0.1:8080/
//! ```

use std::path::PathBuf;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: gen-cert DIR [NAME...]");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&dir)?;

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "muster throwaway CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names = vec!["localhost".to_string()];
    names.extend(args);
    let mut leaf = CertificateParams::new(names)?;
    for ip in ["127.0.0.1", "::1"] {
        leaf.subject_alt_names.push(SanType::IpAddress(ip.parse()?));
    }
    leaf.distinguished_name.push(DnType::CommonName, "muster");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;

    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    println!("wrote {0}/ca.pem {0}/cert.pem {0}/key.pem", dir.display());
    Ok(())
}
