//! PEM certificate files, read the same way by the listeners (server and client-CA
//! certificates) and the CLI (`--ca`).

use std::path::Path;

use anyhow::bail;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

/// Every certificate in the PEM file at `path`; an error naming `flag` when there is none.
pub fn read_certs(flag: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{flag}: cannot read PEM certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{flag}: no PEM certificate in {}", path.display());
    }
    Ok(certs)
}
