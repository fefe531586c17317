//! The administration commands: `twinmesh certs` (a site CA and node certificates),
//! `twinmesh keys` (AES-256 key files) and `twinmesh acl` (the Zenoh access control a
//! roster generates). The files themselves are written by the daemon library
//! ([`twinmesh_nodes::certs`], [`twinmesh_nodes::keys`], [`twinmesh_nodes::acl`]),
//! which `up` and the tests use too.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use twinmesh_nodes::acl::Roster;
use twinmesh_nodes::certs::{init_ca, issue};
use twinmesh_nodes::keys::{new_key_file, rotate};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new key file with one random key (refuses to overwrite).
    New {
        /// The key file to create (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Id of the key (stored with every value it seals).
        #[arg(long, default_value = "k1")]
        id: String,
    },
    /// Append a new key: new values are sealed with it, old ones still open.
    Rotate {
        file: PathBuf,
        #[arg(long)]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a site CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "twinmesh site CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate for a node or device, signed by the CA in DIR.
    Issue {
        /// Node or device name (the certificate's CN).
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address it is reached at (repeatable; default localhost,
        /// 127.0.0.1, ::1 and the name).
        #[arg(long)]
        san: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn certs(args: CertsArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init { dir, name, days } => {
            init_ca(&dir, &name, days)?;
            writeln!(
                out,
                "site CA written to {} (keep ca.key offline; nodes need only ca.pem)",
                dir.join("ca.pem").display()
            )?;
        }
        CertsCommand::Issue {
            name,
            dir,
            san,
            days,
        } => {
            let (cert, _) = issue(&dir, &name, &san, days)?;
            writeln!(out, "certificate for {name} written to {}", cert.display())?;
        }
    }
    Ok(())
}

pub fn keys(args: KeysArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match args.command {
        KeysCommand::New { out: file, id } => {
            new_key_file(&file, &id)?;
            writeln!(out, "wrote key {id} to {}", file.display())?;
        }
        KeysCommand::Rotate { file, id } => {
            rotate(&file, &id)?;
            writeln!(
                out,
                "key {id} added to {}: new values are sealed with it",
                file.display()
            )?;
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct AclArgs {
    /// The roster file (TOML: `mesh = [...]`, `readers = [...]`, `[gateways]
    /// SITE = [...]`), the one given to every node with `--acl`.
    pub roster: std::path::PathBuf,
}

/// `twinmesh acl ROSTER`: validates the roster and prints the generated block (JSON).
pub fn acl(args: AclArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let roster = Roster::from_file(&args.roster)?;
    writeln!(out, "{:#}", json!({ "access_control": roster.zenoh_acl() }))?;
    Ok(())
}
