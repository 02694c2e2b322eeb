# streamboot on a Nomad cluster (Docker driver): the same shape as compose.yaml.
#
#   nomad var put nomad/jobs/streamboot api_token=... postgres_password=... \
#     nats_password_registry=... nats_password_stream=... nats_password_cache=... \
#     nats_password_boot=... nats_password_cli=... \
#     sealing_key="$(openssl rand -base64 32 | tr '+/' '-_' | tr -d '=')"
#   nomad job run -var dhcp_interface=eth1 -var stream_count=4 deploy/nomad/streamboot.nomad.hcl
# (NATS runs as a cluster of var.nats_count servers, 3 by default, on distinct machines.)
#
# Services find each other through Nomad's own service discovery (templates below).
# registry, stream and cache mount the host volume `var.vdisk_volume` at the image's
# STREAMBOOT_VDISK_DIR: on a multi-node cluster it must be the SAME shared mount (NFS,
# CephFS...) on every client, because the registry writes the vdisk store that stream and
# cache read. Each instance's own state (DATA_DIR) stays local to it.
# Several machines, the NATS cluster and what scales how: docs/deploy.md.

variable "image" {
  type    = string
  default = "streamboot:latest"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "nats_count" {
  description = "NATS servers, a JetStream cluster on distinct machines: every stream and bucket streamboot creates is kept by each (STREAMBOOT_NATS_REPLICAS), so the bus survives the loss of a minority of them"
  type        = number
  default     = 3

  validation {
    condition     = contains([1, 3, 5], var.nats_count)
    error_message = "nats_count must be 1, 3 or 5: JetStream needs a majority of an odd number of servers, and keeps at most 5 replicas."
  }
}

variable "registry_count" {
  description = "Registry replicas: they share the log (appends serialised by an advisory lock)"
  type        = number
  default     = 1
}

variable "stream_count" {
  description = "Stream nodes: more nodes, more clients (placement by heartbeat load)"
  type        = number
  default     = 2
}

variable "cache_count" {
  description = "Cache nodes, one per machine (distinct_hosts): each holds the write caches placed on it (opens are routed to the holder; docs/cache.md). With one Nomad client, set 1: the second cannot be placed"
  type        = number
  default     = 2
}

variable "dhcp_mode" {
  description = "proxy (beside the network's DHCP server) or full (boot is the DHCP server)"
  type        = string
  default     = "proxy"
}

variable "dhcp_interface" {
  description = "The interface of the boot nodes on the clients' network (e.g. eth1)"
  type        = string
}

variable "cache_stores" {
  description = "STREAMBOOT_CACHE_STORES for the registry and the cache nodes: other stores by name, JSON ({\"nas\": \"ftp://user:pw@nas/vdisks\"}); empty = the local vdisk dir only. A URL with a password: pass it with -var-file from a file kept out of version control"
  type        = string
  default     = ""
}

variable "vdisk_volume" {
  description = "Host volume holding the vdisk store: one shared mount across the clients"
  type        = string
  default     = "streamboot-vdisks"
}

locals {
  # Environment shared by every streamboot task (the per-task part is in its env block):
  # the endpoints of NATS (every member as a seed: the client learns the cluster and moves
  # to another member when its server dies) and Jaeger as Nomad knows them now (the task
  # restarts when they move), every stream and bucket kept by each NATS server, tracing on.
  bus_env = <<-EOT
    STREAMBOOT_TRACE_EXPORTER=otlp
    STREAMBOOT_NATS_REPLICAS=${var.nats_count}
    STREAMBOOT_NATS_URL={{ range $i, $s := nomadService "streamboot-nats" }}{{ if $i }},{{ end }}nats://{{ $s.Address }}:{{ $s.Port }}{{ end }}
    {{ range nomadService "streamboot-jaeger-otlp" }}STREAMBOOT_OTLP_ENDPOINT=http://{{ .Address }}:{{ .Port }}/v1/traces
    {{ end }}
  EOT
}

job "streamboot" {
  datacenters = var.datacenters
  type        = "service"

  # NATS with JetStream, a cluster of var.nats_count servers on distinct machines (each
  # with its own streamboot-nats volume); max_payload (8 MB, vdisk block batches) is
  # config-file only.
  group "nats" {
    count = var.nats_count

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      port "client" {
        to = 4222
      }
      port "cluster" {
        to = 6222
      }
      port "monitor" {
        to = 8222
      }
    }

    volume "nats" {
      type   = "host"
      source = "streamboot-nats"
    }

    service {
      name     = "streamboot-nats"
      provider = "nomad"
      port     = "client"

      check {
        type     = "http"
        port     = "monitor"
        path     = "/healthz?js-enabled-only=true"
        interval = "10s"
        timeout  = "3s"
      }
    }

    # The route port of each member, for the others' configuration (no check: a member
    # is routable before its JetStream has a leader).
    service {
      name     = "streamboot-nats-cluster"
      provider = "nomad"
      port     = "cluster"
    }

    task "nats" {
      driver = "docker"

      config {
        image = "nats:2.10-alpine"
        args  = ["-c", "/secrets/nats.conf"]
        ports = ["client", "cluster", "monitor"]
      }

      volume_mount {
        volume      = "nats"
        destination = "/data"
      }

      # In secrets/: it holds every role's NATS password. Routes to every member Nomad
      # knows of and to this one (a JetStream server in a cluster does not start without
      # a route; the one to itself is ignored); rendered again as members come and go,
      # which the server reloads (SIGHUP). Each member advertises the host's address and
      # port, which the others and the clients reach.
      template {
        destination   = "secrets/nats.conf"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-EOT
          server_name: streamboot-nats-{{ env "NOMAD_ALLOC_INDEX" }}
          listen: 0.0.0.0:4222
          client_advertise: "{{ env "NOMAD_ADDR_client" }}"
          http: 0.0.0.0:8222
          max_payload: 8MB
          jetstream {
            store_dir: /data/jetstream
          }
          cluster {
            name: streamboot
            listen: 0.0.0.0:6222
            advertise: "{{ env "NOMAD_ADDR_cluster" }}"
            routes: [
              nats://{{ env "NOMAD_ADDR_cluster" }}{{ range nomadService "streamboot-nats-cluster" }}
              nats://{{ .Address }}:{{ .Port }}{{ end }}
            ]
          }
          # A user per role, only its own subjects (generated from shared/bus_access.py:
          # tests/deploy/test_deploy_files.py checks it); no anonymous client.
          {{ with nomadVar "nomad/jobs/streamboot" -}}
          authorization {
            users = [
              {
                user: "registry"
                password: "{{ .nats_password_registry }}"
                permissions: {
                  publish: { allow: [
                    "events.>",
                    "streamboot.stream.*.session.prepare",
                    "streamboot.cache.wc.list",
                    "streamboot.cache.wc.open",
                    "streamboot.cache.node.*.wc.map",
                    "streamboot.cache.node.*.wc.read",
                    "$JS.API.STREAM.INFO.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_heartbeats.>",
                    "$JS.FC.KV_streamboot_heartbeats.>",
                    "$KV.streamboot_heartbeats.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.STREAM.INFO.STREAMBOOT_EVENTS",
                    "$JS.API.STREAM.CREATE.STREAMBOOT_EVENTS",
                  ] }
                  subscribe: { allow: [
                    "streamboot.registry.>",
                    "streamboot.events.append.>",
                    "events.>",
                    "_INBOX.>",
                  ] }
                  allow_responses: true
                }
              }
              {
                user: "stream"
                password: "{{ .nats_password_stream }}"
                permissions: {
                  publish: { allow: [
                    "streamboot.events.append.stream",
                    "streamboot.registry.session.resolve",
                    "streamboot.registry.session.status",
                    "streamboot.cache.wc.open",
                    "streamboot.cache.rc.open",
                    "streamboot.cache.rc.read",
                    "streamboot.cache.node.*.wc.write",
                    "streamboot.cache.node.*.wc.read",
                    "streamboot.cache.node.*.wc.map",
                    "$JS.API.STREAM.INFO.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_heartbeats.>",
                    "$JS.FC.KV_streamboot_heartbeats.>",
                    "$KV.streamboot_heartbeats.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_heartbeats",
                  ] }
                  subscribe: { allow: [
                    "events.SessionClosed.>",
                    "streamboot.stream.*.session.prepare",
                    "streamboot.cache.wc.attached",
                    "_INBOX.>",
                  ] }
                }
              }
              {
                user: "cache"
                password: "{{ .nats_password_cache }}"
                permissions: {
                  publish: { allow: [
                    "streamboot.events.append.cache",
                    "streamboot.registry.session.status",
                    "streamboot.cache.wc.attached",
                    "streamboot.cache.node.*.wc.open",
                    "streamboot.cache.node.*.stats",
                    "$JS.API.STREAM.INFO.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_heartbeats.>",
                    "$JS.FC.KV_streamboot_heartbeats.>",
                    "$KV.streamboot_heartbeats.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.STREAM.INFO.KV_streamboot_cache_owners",
                    "$JS.API.DIRECT.GET.KV_streamboot_cache_owners",
                    "$JS.API.DIRECT.GET.KV_streamboot_cache_owners.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_cache_owners",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_cache_owners",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_cache_owners.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_cache_owners.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_cache_owners.>",
                    "$JS.FC.KV_streamboot_cache_owners.>",
                    "$KV.streamboot_cache_owners.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_cache_owners",
                    "$JS.API.STREAM.INFO.STREAMBOOT_EVENTS",
                    "$JS.API.CONSUMER.INFO.STREAMBOOT_EVENTS.>",
                    "$JS.API.CONSUMER.CREATE.STREAMBOOT_EVENTS.>",
                    "$JS.API.CONSUMER.DURABLE.CREATE.STREAMBOOT_EVENTS.>",
                    "$JS.API.CONSUMER.MSG.NEXT.STREAMBOOT_EVENTS.>",
                    "$JS.ACK.STREAMBOOT_EVENTS.>",
                  ] }
                  subscribe: { allow: [
                    "streamboot.cache.wc.open",
                    "streamboot.cache.wc.list",
                    "streamboot.cache.rc.open",
                    "streamboot.cache.rc.read",
                    "streamboot.cache.stats",
                    "streamboot.cache.node.>",
                    "events.BlocksRequested.>",
                    "events.SessionClosed.>",
                    "events.ClientBooted.>",
                    "events.BootRequested.>",
                    "_INBOX.>",
                  ] }
                  allow_responses: true
                }
              }
              {
                user: "boot"
                password: "{{ .nats_password_boot }}"
                permissions: {
                  publish: { allow: [
                    "streamboot.events.append.boot",
                    "streamboot.registry.device.lookup",
                    "streamboot.registry.session.open",
                    "streamboot.registry.session.resolve",
                    "streamboot.registry.session.nodes",
                    "streamboot.registry.session.close",
                    "$JS.API.STREAM.INFO.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_heartbeats.>",
                    "$JS.FC.KV_streamboot_heartbeats.>",
                    "$KV.streamboot_heartbeats.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.STREAM.INFO.KV_streamboot_boot_traces",
                    "$JS.API.DIRECT.GET.KV_streamboot_boot_traces",
                    "$JS.API.DIRECT.GET.KV_streamboot_boot_traces.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_boot_traces",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_boot_traces",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_boot_traces.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_boot_traces.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_boot_traces.>",
                    "$JS.FC.KV_streamboot_boot_traces.>",
                    "$KV.streamboot_boot_traces.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_boot_traces",
                    "$JS.API.STREAM.INFO.KV_streamboot_boot_handoff",
                    "$JS.API.DIRECT.GET.KV_streamboot_boot_handoff",
                    "$JS.API.DIRECT.GET.KV_streamboot_boot_handoff.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_boot_handoff",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_boot_handoff",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_boot_handoff.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_boot_handoff.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_boot_handoff.>",
                    "$JS.FC.KV_streamboot_boot_handoff.>",
                    "$KV.streamboot_boot_handoff.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_boot_handoff",
                    "$JS.API.STREAM.INFO.KV_streamboot_boot_nonces",
                    "$JS.API.DIRECT.GET.KV_streamboot_boot_nonces",
                    "$JS.API.DIRECT.GET.KV_streamboot_boot_nonces.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_boot_nonces",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_boot_nonces",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_boot_nonces.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_boot_nonces.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_boot_nonces.>",
                    "$JS.FC.KV_streamboot_boot_nonces.>",
                    "$KV.streamboot_boot_nonces.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_boot_nonces",
                    "$JS.API.STREAM.INFO.KV_streamboot_dhcp_leases",
                    "$JS.API.DIRECT.GET.KV_streamboot_dhcp_leases",
                    "$JS.API.DIRECT.GET.KV_streamboot_dhcp_leases.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_dhcp_leases",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_dhcp_leases",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_dhcp_leases.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_dhcp_leases.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_dhcp_leases.>",
                    "$JS.FC.KV_streamboot_dhcp_leases.>",
                    "$KV.streamboot_dhcp_leases.>",
                    "$JS.API.STREAM.CREATE.KV_streamboot_dhcp_leases",
                  ] }
                  subscribe: { allow: [
                    "_INBOX.>",
                  ] }
                }
              }
              {
                user: "cli"
                password: "{{ .nats_password_cli }}"
                permissions: {
                  publish: { allow: [
                    "streamboot.cache.wc.open",
                    "streamboot.cache.node.*.wc.map",
                    "streamboot.cache.node.*.wc.read",
                    "streamboot.cache.stats",
                    "$JS.API.STREAM.INFO.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats",
                    "$JS.API.DIRECT.GET.KV_streamboot_heartbeats.>",
                    "$JS.API.STREAM.MSG.GET.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats",
                    "$JS.API.CONSUMER.CREATE.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.INFO.KV_streamboot_heartbeats.>",
                    "$JS.API.CONSUMER.DELETE.KV_streamboot_heartbeats.>",
                    "$JS.FC.KV_streamboot_heartbeats.>",
                  ] }
                  subscribe: { allow: [
                    "_INBOX.>",
                  ] }
                }
              }
            ]
          }
          {{- end }}
        EOT
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "postgres" {
    count = 1

    network {
      port "db" {
        to = 5432
      }
    }

    volume "pg" {
      type   = "host"
      source = "streamboot-postgres"
    }

    service {
      name     = "streamboot-postgres"
      provider = "nomad"
      port     = "db"

      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "postgres" {
      driver = "docker"

      config {
        image = "postgres:16-alpine"
        ports = ["db"]
      }

      volume_mount {
        volume      = "pg"
        destination = "/var/lib/postgresql/data"
      }

      env {
        POSTGRES_USER = "streamboot"
        POSTGRES_DB   = "streamboot"
      }

      template {
        destination = "secrets/pg.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/streamboot" }}POSTGRES_PASSWORD={{ .postgres_password }}{{ end }}
        EOT
      }

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }

  group "jaeger" {
    count = 1

    network {
      port "otlp" {
        to = 4318
      }
      port "ui" {
        to = 16686
      }
      port "admin" {
        to = 14269
      }
    }

    service {
      name     = "streamboot-jaeger-otlp"
      provider = "nomad"
      port     = "otlp"

      check {
        type     = "http"
        port     = "admin"
        path     = "/"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "jaeger" {
      driver = "docker"

      config {
        image = "jaegertracing/all-in-one:1.62.0"
        ports = ["otlp", "ui", "admin"]
      }

      env {
        COLLECTOR_OTLP_ENABLED = "true"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  # The only group that talks to PostgreSQL.
  group "registry" {
    count = var.registry_count

    network {
      port "api" {
        to = 18080
      }
      port "metrics" {
        to = 9464
      }
    }

    volume "vdisks" {
      type   = "host"
      source = var.vdisk_volume
    }

    service {
      name     = "streamboot-registry"
      provider = "nomad"
      port     = "api"

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "registry" {
      driver = "docker"

      config {
        image   = var.image
        command = "python"
        args    = ["-m", "services.registry"]
        ports   = ["api", "metrics"]
      }

      volume_mount {
        volume      = "vdisks"
        destination = "/srv/streamboot/vdisks"
      }

      env {
        STREAMBOOT_NODE_ID      = "registry-${NOMAD_ALLOC_INDEX}"
        STREAMBOOT_DATA_DIR     = "${NOMAD_ALLOC_DIR}/data"
        STREAMBOOT_BIND_HOST    = "0.0.0.0"
        STREAMBOOT_API_PORT     = "18080"
        STREAMBOOT_METRICS_PORT = "9464"
        # Checks a vdisk's store by name (vdisk import/set --store).
        STREAMBOOT_CACHE_STORES = var.cache_stores
        # Every replica seals and opens CHAP secrets with the same key, which outlives the
        # allocation (DATA_DIR is the allocation's own): the template below writes it.
        STREAMBOOT_SEALING_KEY_FILE = "${NOMAD_SECRETS_DIR}/sealing-key"
      }

      template {
        destination = "local/bus.env"
        env         = true
        data        = local.bus_env
      }

      # This task's NATS user (docs/security.md): its role, its password only.
      template {
        destination = "secrets/nats.env"
        env         = true
        data        = <<-EOT
          STREAMBOOT_NATS_USER=registry
          {{ with nomadVar "nomad/jobs/streamboot" }}STREAMBOOT_NATS_PASSWORD={{ .nats_password_registry }}{{ end }}
        EOT
      }

      template {
        destination = "secrets/registry.env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/streamboot" }}STREAMBOOT_API_TOKEN={{ .api_token }}
          {{ $password := .postgres_password }}{{ range nomadService "streamboot-postgres" }}STREAMBOOT_DATABASE_URL=postgresql://streamboot:{{ $password }}@{{ .Address }}:{{ .Port }}/streamboot
          {{ end }}{{ end }}
        EOT
      }

      # The sealing key: a file readable by the image's user only, never in the task's env.
      template {
        destination = "secrets/sealing-key"
        perms       = "0400"
        uid         = 10001
        gid         = 10001
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/streamboot" }}{{ .sealing_key }}{{ end }}
        EOT
      }

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }

  # DHCP needs the clients' broadcast domain: host network, standard ports. One per
  # broadcast domain (or proxyDHCP beside an existing DHCP server): pin it with a constraint.
  group "boot" {
    count = 1

    # DHCP leases (full mode) under DATA_DIR: kept on the node across updates.
    ephemeral_disk {
      sticky  = true
      migrate = true
    }

    network {
      mode = "host"
      port "dhcp" {
        static = 67
      }
      port "pxe" {
        static = 4011
      }
      port "tftp" {
        static = 69
      }
      port "http" {
        static = 18082
      }
      port "metrics" {}
    }

    service {
      name     = "streamboot-boot"
      provider = "nomad"
      port     = "metrics"

      check {
        type     = "http"
        path     = "/metrics"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "boot" {
      driver = "docker"
      # Binding 67, 69 and 4011 needs CAP_NET_BIND_SERVICE (and SO_BINDTODEVICE on the
      # interface CAP_NET_RAW on older kernels), which Docker gives only to root: root in
      # the container, every other capability dropped. DATA_DIR (leases) is the alloc's.
      user = "root"

      config {
        image        = var.image
        command      = "python"
        args         = ["-m", "services.boot"]
        network_mode = "host"
        cap_drop     = ["all"]
        cap_add      = ["net_bind_service", "net_raw"]
      }

      env {
        STREAMBOOT_NODE_ID        = "boot-${node.unique.name}"
        STREAMBOOT_BIND_HOST      = "0.0.0.0"
        STREAMBOOT_DATA_DIR       = "${NOMAD_ALLOC_DIR}/data"
        STREAMBOOT_PUBLIC_HOST    = "${NOMAD_IP_http}"
        STREAMBOOT_DHCP_MODE      = var.dhcp_mode
        STREAMBOOT_DHCP_INTERFACE = var.dhcp_interface
        STREAMBOOT_DHCP_PORT      = "${NOMAD_PORT_dhcp}"
        STREAMBOOT_DHCP_PXE_PORT  = "${NOMAD_PORT_pxe}"
        STREAMBOOT_TFTP_PORT      = "${NOMAD_PORT_tftp}"
        STREAMBOOT_BOOT_HTTP_PORT = "${NOMAD_PORT_http}"
        STREAMBOOT_METRICS_PORT   = "${NOMAD_PORT_metrics}"
      }

      template {
        destination = "local/bus.env"
        env         = true
        data        = local.bus_env
      }

      # This task's NATS user (docs/security.md): its role, its password only.
      template {
        destination = "secrets/nats.env"
        env         = true
        data        = <<-EOT
          STREAMBOOT_NATS_USER=boot
          {{ with nomadVar "nomad/jobs/streamboot" }}STREAMBOOT_NATS_PASSWORD={{ .nats_password_boot }}{{ end }}
        EOT
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }

  # The data plane scales out: each node serves the clients the registry places on it.
  # Host network with dynamic ports, so several can share a machine and each advertises
  # an address the clients reach.
  group "stream" {
    count = var.stream_count

    spread {
      attribute = "${node.unique.id}"
    }

    network {
      mode = "host"
      port "nbd" {}
      port "http" {}
      port "metrics" {}
    }

    volume "vdisks" {
      type      = "host"
      source    = var.vdisk_volume
      read_only = true
    }

    service {
      name     = "streamboot-stream"
      provider = "nomad"
      port     = "metrics"

      check {
        type     = "http"
        path     = "/metrics"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "stream" {
      driver = "docker"

      config {
        image        = var.image
        command      = "python"
        args         = ["-m", "services.stream"]
        network_mode = "host"
      }

      volume_mount {
        volume      = "vdisks"
        destination = "/srv/streamboot/vdisks"
        read_only   = true
      }

      env {
        STREAMBOOT_NODE_ID          = "stream-${node.unique.name}-${NOMAD_ALLOC_INDEX}"
        STREAMBOOT_DATA_DIR         = "${NOMAD_ALLOC_DIR}/data"
        STREAMBOOT_BIND_HOST        = "${NOMAD_IP_nbd}"
        STREAMBOOT_PUBLIC_HOST      = "${NOMAD_IP_nbd}"
        STREAMBOOT_NBD_PORT         = "${NOMAD_PORT_nbd}"
        STREAMBOOT_HTTP_STREAM_PORT = "${NOMAD_PORT_http}"
        STREAMBOOT_METRICS_PORT     = "${NOMAD_PORT_metrics}"
      }

      template {
        destination = "local/bus.env"
        env         = true
        data        = local.bus_env
      }

      # This task's NATS user (docs/security.md): its role, its password only.
      template {
        destination = "secrets/nats.env"
        env         = true
        data        = <<-EOT
          STREAMBOOT_NATS_USER=stream
          {{ with nomadVar "nomad/jobs/streamboot" }}STREAMBOOT_NATS_PASSWORD={{ .nats_password_stream }}{{ end }}
        EOT
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }

  # Several cache nodes: each session's write cache lives on one of them (its host volume
  # or /dev/shm) and every request about it is routed there (docs/cache.md). A node is its
  # STREAMBOOT_NODE_ID plus that volume: one per machine (two would share the volume), and
  # it must come back on the same machine to serve its caches again.
  group "cache" {
    count = var.cache_count

    constraint {
      distinct_hosts = true
    }

    network {
      port "metrics" {
        to = 9464
      }
    }

    volume "vdisks" {
      type      = "host"
      source    = var.vdisk_volume
      read_only = true
    }

    # Write caches (kept ones survive a restart) and the read cache: local to the node.
    volume "state" {
      type   = "host"
      source = "streamboot-cache"
    }

    service {
      name     = "streamboot-cache"
      provider = "nomad"
      port     = "metrics"

      check {
        type     = "http"
        path     = "/metrics"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "cache" {
      driver = "docker"

      config {
        image   = var.image
        command = "python"
        args    = ["-m", "services.cache"]
        ports   = ["metrics"]
        # server-ram write caches live in /dev/shm (Docker's default is 64 MB).
        shm_size = 2147483648
      }

      volume_mount {
        volume      = "vdisks"
        destination = "/srv/streamboot/vdisks"
        read_only   = true
      }

      volume_mount {
        volume      = "state"
        destination = "/var/lib/streamboot"
      }

      env {
        STREAMBOOT_NODE_ID      = "cache-${node.unique.name}-${NOMAD_ALLOC_INDEX}"
        STREAMBOOT_BIND_HOST    = "0.0.0.0"
        STREAMBOOT_METRICS_PORT = "9464"
        # Reads the vdisks put in another store (an FTP share, a block device).
        STREAMBOOT_CACHE_STORES = var.cache_stores
      }

      template {
        destination = "local/bus.env"
        env         = true
        data        = local.bus_env
      }

      # This task's NATS user (docs/security.md): its role, its password only.
      template {
        destination = "secrets/nats.env"
        env         = true
        data        = <<-EOT
          STREAMBOOT_NATS_USER=cache
          {{ with nomadVar "nomad/jobs/streamboot" }}STREAMBOOT_NATS_PASSWORD={{ .nats_password_cache }}{{ end }}
        EOT
      }

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
