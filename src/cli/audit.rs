//! `datastorage audit export|verify-export|keygen`: save a signed export of
//! the audit trail, check a saved one offline, make a signing key pair.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Subcommand};

use super::client::{Bearer, CliError, ServerArgs};
use crate::{
    integrity::export::{generate_key_pair, verify_saved_export, DetachedSignature},
    proto::v1::{self as pb, export_audit_events_response::Item, incident_query_client::IncidentQueryClient},
};

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  done; for `verify-export`, the signature and every checkable link hold
  1  the request failed, or a file could not be read or written
  2  the command line is invalid
  3  `verify-export`: the export is not authentic or names broken links";

const EXIT_OK: u8 = 0;
const EXIT_ERROR: u8 = 1;
const EXIT_NOT_AUTHENTIC: u8 = 3;

#[derive(Debug, Args)]
#[command(after_help = EXIT_STATUS_HELP)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Save a signed export of a correlation id's chain (or of every chain)
    /// from a running server: FILE holds the lines, FILE.sig the signature.
    Export {
        #[command(flatten)]
        server: ServerArgs,
        /// Only this correlation id's chain.
        #[arg(long)]
        correlation_id: Option<String>,
        /// Mask e-mail addresses, IP addresses, phone numbers and secrets.
        #[arg(long)]
        redact_pii: bool,
        /// Where to write the export.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Check a saved export offline: its signature, its shape, and every
    /// SHA-256 chain link that can be recomputed from it.
    VerifyExport {
        /// The export, as `audit export` saved it.
        file: PathBuf,
        /// The signer's Ed25519 public key (SPKI PEM).
        #[arg(long)]
        public_key: PathBuf,
        /// The detached signature; default: FILE.sig.
        #[arg(long)]
        signature: Option<PathBuf>,
    },
    /// Write a new Ed25519 signing key (PKCS#8 PEM, mode 0600) and its public
    /// key (OUT.pub) for `integrity.export_signing_key`.
    Keygen {
        #[arg(long, short)]
        out: PathBuf,
    },
}

pub async fn run(args: AuditArgs) -> ExitCode {
    let outcome = match args.command {
        AuditCommand::Export {
            server,
            correlation_id,
            redact_pii,
            out,
        } => export(server, correlation_id, redact_pii, &out).await,
        AuditCommand::VerifyExport {
            file,
            public_key,
            signature,
        } => verify(&file, &public_key, signature.as_deref()),
        AuditCommand::Keygen { out } => keygen(&out),
    };
    match outcome {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn signature_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".sig");
    name.into()
}

fn io_error(path: &Path, error: std::io::Error) -> CliError {
    CliError::Local(format!("{}: {error}", path.display()))
}

async fn export(
    server: ServerArgs,
    correlation_id: Option<String>,
    redact_pii: bool,
    out: &Path,
) -> Result<u8, CliError> {
    let bearer: Bearer = server.bearer()?;
    let mut client = IncidentQueryClient::with_interceptor(server.channel().await?, bearer);
    let mut stream = client
        .export_audit_events(pb::ExportAuditEventsRequest {
            filter: None,
            correlation_id: correlation_id.unwrap_or_default(),
            redact_pii,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    let mut summary = None;
    while let Some(message) = stream.message().await? {
        match message.item {
            Some(Item::Event(event)) => bytes.extend(event.signed_line),
            Some(Item::Summary(last)) => {
                bytes.extend(&last.signed_line);
                summary = Some(last);
            }
            None => continue,
        }
        bytes.push(b'\n');
    }
    let summary = summary.ok_or_else(|| CliError::Local("the export ended without its summary".into()))?;
    std::fs::write(out, &bytes).map_err(|e| io_error(out, e))?;
    let signature = DetachedSignature::new(&summary.key_id, &summary.signature);
    let sig_path = signature_path(out);
    let sig_json = serde_json::to_string_pretty(&signature).expect("a signature serialises");
    std::fs::write(&sig_path, sig_json + "\n").map_err(|e| io_error(&sig_path, e))?;
    println!(
        "exported {} events ({} verified, {} tampered) to {}; signature in {}",
        summary.total_events,
        summary.verified_events,
        summary.tampered_event_ids.len(),
        out.display(),
        sig_path.display()
    );
    Ok(EXIT_OK)
}

fn verify(file: &Path, public_key: &Path, signature: Option<&Path>) -> Result<u8, CliError> {
    let bytes = std::fs::read(file).map_err(|e| io_error(file, e))?;
    let public = std::fs::read_to_string(public_key).map_err(|e| io_error(public_key, e))?;
    let sig_path = signature.map_or_else(|| signature_path(file), Path::to_path_buf);
    let sig_text = std::fs::read_to_string(&sig_path).map_err(|e| io_error(&sig_path, e))?;
    let signature: DetachedSignature = serde_json::from_str(&sig_text)
        .map_err(|e| CliError::Local(format!("{}: not a signature file: {e}", sig_path.display())))?;
    match verify_saved_export(&bytes, &signature, &public) {
        Err(error) => {
            println!("NOT AUTHENTIC: {error:#}");
            Ok(EXIT_NOT_AUTHENTIC)
        }
        Ok(check) if !check.broken_links.is_empty() => {
            println!(
                "signature valid (key {}), but {} of {} events have broken chain links: {}",
                signature.key_id,
                check.broken_links.len(),
                check.events,
                check
                    .broken_links
                    .iter()
                    .map(|id| id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(EXIT_NOT_AUTHENTIC)
        }
        Ok(check) => {
            println!(
                "OK: signature valid (key {}); {} events, {} links recomputed, {} not recomputable offline \
                 (keyed or redacted)",
                signature.key_id, check.events, check.links_rechecked, check.links_not_checkable
            );
            Ok(EXIT_OK)
        }
    }
}

fn keygen(out: &Path) -> Result<u8, CliError> {
    let (private, public) = generate_key_pair().map_err(|e| CliError::Local(e.to_string()))?;
    write_private(out, &private).map_err(|e| io_error(out, e))?;
    let mut public_path = out.as_os_str().to_owned();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    std::fs::write(&public_path, &public).map_err(|e| io_error(&public_path, e))?;
    println!(
        "signing key: {} (keep it secret); public key: {}",
        out.display(),
        public_path.display()
    );
    Ok(EXIT_OK)
}

fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(pem.as_bytes())
}
