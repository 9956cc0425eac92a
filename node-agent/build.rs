//! Compiles the runtime APIs the agent is a client of: the CRI (`proto/cri/api.proto`) and the
//! part of containerd's Tasks API it needs (`proto/containerd/tasks.proto`, with the runc shim's
//! checkpoint options, `proto/containerd/runc.proto`), clients only; and the kubelet's device
//! plugin API (`proto/kubelet/deviceplugin/v1beta1`: the agent serves `DevicePlugin` and calls
//! `Registration`) and pod resources API (`proto/kubelet/podresources/v1`, a client). protoc
//! comes from the protoc-bin-vendored crate, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(
            config,
            &[
                "proto/cri/api.proto",
                "proto/containerd/tasks.proto",
                "proto/containerd/runc.proto",
            ],
            &["proto"],
        )?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "proto/kubelet/deviceplugin/v1beta1/api.proto",
            "proto/kubelet/podresources/v1/api.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
