fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Build without a system protoc: the vendored binary works on a fresh machine.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; the variable is read by prost-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<_> = std::fs::read_dir("proto/portcullis/admin/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("portcullis_descriptor.bin"))
        .compile_protos(&protos, &[std::path::PathBuf::from("proto")])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
