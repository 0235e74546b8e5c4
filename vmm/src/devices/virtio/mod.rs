//! virtio 1.x devices over the virtio-mmio transport.
