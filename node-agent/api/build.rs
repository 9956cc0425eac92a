//! Compiles proto/agent.proto into the tonic client and server (into OUT_DIR; nothing generated is
//! committed). protoc comes from the protoc-bin-vendored crate, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/agent.proto"],
        &["proto"],
    )?;
    Ok(())
}
