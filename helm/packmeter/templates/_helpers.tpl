{{/*
Shared helpers. Deployment, DaemonSet and the sidecar snippet printed by
NOTES.txt all render the container from "packmeter.container", so the three
modes cannot drift apart.
*/}}

{{/* === names and labels === */}}

{{- define "packmeter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "packmeter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "packmeter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "packmeter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "packmeter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "packmeter.labels" -}}
helm.sh/chart: {{ include "packmeter.chart" . }}
{{ include "packmeter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: metering
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "packmeter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "packmeter.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "packmeter.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* === derived settings === */}}

{{/* Name of the Secret holding the PostgreSQL URL (existing or created). */}}
{{- define "packmeter.storeSecretName" -}}
{{- default (printf "%s-store" (include "packmeter.fullname" .)) .Values.store.postgres.existingSecret -}}
{{- end -}}

{{/* The data volume kind after resolving "" to the mode's default. */}}
{{- define "packmeter.persistenceType" -}}
{{- if .Values.persistence.type -}}
{{- .Values.persistence.type -}}
{{- else if and (eq .Values.store.type "postgres") (ne .Values.mode "daemonset") -}}
{{- /* With PostgreSQL only the spill file is local (XDG_DATA_HOME points at
the data volume). A Deployment's replicas cannot each have a claim of their
own, so they get scratch space; a DaemonSet keeps hostPath (below), where a
spill file outlives the pod and the node's next pod replays it. */ -}}
emptyDir
{{- else if eq .Values.mode "deployment" -}}
pvc
{{- else if eq .Values.mode "daemonset" -}}
hostPath
{{- else -}}
emptyDir
{{- end -}}
{{- end -}}

{{- define "packmeter.pvcName" -}}
{{- default (printf "%s-data" (include "packmeter.fullname" .)) .Values.persistence.pvc.existingClaim -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds. Kubernetes starts the countdown when the pod is
deleted, runs preStop, and only then sends SIGTERM; so the period must cover
the preStop sleep plus the binary's drain-and-flush grace, or the kubelet
SIGKILLs a process that is still flushing.
*/}}
{{- define "packmeter.terminationGracePeriodSeconds" -}}
{{- $floor := add (int .Values.preStop.sleepSeconds) (int .Values.config.shutdownGraceSeconds) -}}
{{- $set := .Values.terminationGracePeriodSeconds -}}
{{- if or (kindIs "invalid" $set) (eq (toString $set) "") -}}
{{- add $floor (int .Values.terminationGraceMarginSeconds) -}}
{{- else if le (int $set) $floor -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than preStop.sleepSeconds + config.shutdownGraceSeconds (%d), or the kubelet kills packmeter before its final flush" (int $set) $floor) -}}
{{- else -}}
{{- int $set -}}
{{- end -}}
{{- end -}}

{{- define "packmeter.internalTrafficPolicy" -}}
{{- if .Values.service.internalTrafficPolicy -}}
{{- .Values.service.internalTrafficPolicy -}}
{{- else if eq .Values.mode "daemonset" -}}
Local
{{- else -}}
Cluster
{{- end -}}
{{- end -}}

{{/*
Cross-field checks that values.schema.json cannot express. Included from the
ConfigMap, which every mode renders. (`helm lint` only logs `fail`; helm/lint.py
turns that log line into a lint failure.)
*/}}
{{- define "packmeter.validate" -}}
{{- $v := .Values -}}
{{- $p := include "packmeter.persistenceType" . -}}
{{- if not (has $v.mode (list "deployment" "daemonset" "sidecar")) -}}
{{- fail (printf "mode must be deployment, daemonset or sidecar, not %q" (toString $v.mode)) -}}
{{- end -}}
{{- if not (has $p (list "pvc" "emptyDir" "hostPath")) -}}
{{- fail (printf "persistence.type must be pvc, emptyDir, hostPath or empty, not %q" $p) -}}
{{- end -}}
{{- if eq $v.store.type "postgres" -}}
{{- if and (not $v.store.postgres.existingSecret) (not $v.store.postgres.url) -}}
{{- fail "store.type=postgres needs store.postgres.existingSecret (preferred) or store.postgres.url" -}}
{{- end -}}
{{- if and $v.store.postgres.url (not (hasPrefix "postgres" $v.store.postgres.url)) -}}
{{- fail "store.postgres.url must start with postgres:// or postgresql://" -}}
{{- end -}}
{{- else if eq $v.store.type "sqlite" -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $v.persistence.mountPath)) $v.store.sqlite.path) -}}
{{- fail (printf "store.sqlite.path (%s) must be inside persistence.mountPath (%s): the root filesystem is read-only" $v.store.sqlite.path $v.persistence.mountPath) -}}
{{- end -}}
{{- if and (eq $v.mode "deployment") (gt (int $v.deployment.replicas) 1) -}}
{{- fail "store.type=sqlite allows deployment.replicas=1 only (one SQLite file, one writer); use store.type=postgres to scale out" -}}
{{- end -}}
{{- else -}}
{{- fail (printf "store.type must be sqlite or postgres, not %q" (toString $v.store.type)) -}}
{{- end -}}
{{- if and (eq $p "pvc") (eq $v.mode "daemonset") -}}
{{- fail "persistence.type=pvc is not available in daemonset mode (one claim cannot serve every node); use hostPath or emptyDir" -}}
{{- end -}}
{{- if and (eq $p "pvc") (eq $v.mode "deployment") (gt (int $v.deployment.replicas) 1) -}}
{{- if not $v.persistence.pvc.existingClaim -}}
{{- fail "persistence.type=pvc with deployment.replicas > 1 would share one ReadWriteOnce claim; use emptyDir with store.type=postgres" -}}
{{- else -}}
{{- fail "persistence.pvc.existingClaim with deployment.replicas > 1 would give every replica the same data directory, and so the same spill file; use emptyDir (or mode=daemonset with hostPath) with store.type=postgres" -}}
{{- end -}}
{{- end -}}
{{- if not (has $v.probes.type (list "grpc" "http")) -}}
{{- fail (printf "probes.type must be grpc or http, not %q" (toString $v.probes.type)) -}}
{{- end -}}
{{- if and $v.tls.existingSecret (eq $v.probes.type "grpc") -}}
{{- fail "tls.existingSecret with probes.type=grpc: kubelet's gRPC probes speak plaintext and cannot check a TLS port; set probes.type=http (/livez and /readyz on the admin port, which stays plaintext)" -}}
{{- end -}}
{{- if and $v.tls.clientAuth (not $v.tls.existingSecret) -}}
{{- fail "tls.clientAuth needs tls.existingSecret: client certificates are checked only on a TLS port" -}}
{{- end -}}
{{- if le (int $v.config.shutdownGraceSeconds) 0 -}}
{{- fail "config.shutdownGraceSeconds must be positive" -}}
{{- end -}}
{{- if eq (int $v.config.grpcPort) (int $v.config.adminPort) -}}
{{- fail "config.grpcPort and config.adminPort must differ" -}}
{{- end -}}
{{- $_ := include "packmeter.terminationGracePeriodSeconds" . -}}
{{- end -}}

{{/* === pod building blocks === */}}

{{/* One probe. Args: dict "root" $ "probe" <values> "check" <values holding grpcService/httpPath>. */}}
{{- define "packmeter.probe" -}}
{{- $v := .root.Values -}}
{{- if eq $v.probes.type "grpc" -}}
grpc:
  port: {{ int $v.config.grpcPort }}
  {{- with .check.grpcService }}
  service: {{ . | quote }}
  {{- end }}
{{- else -}}
httpGet:
  path: {{ .check.httpPath }}
  port: {{ int $v.config.adminPort }}
{{- end }}
periodSeconds: {{ int .probe.periodSeconds }}
timeoutSeconds: {{ int .probe.timeoutSeconds }}
failureThreshold: {{ int .probe.failureThreshold }}
{{- end -}}

{{/*
The packmeter container. Args: dict "root" $ "sidecar" <bool>.
In sidecar mode the port names get a "packmeter-" prefix so they cannot clash
with the gateway's own ports ("grpc", "admin" are common names).
*/}}
{{- define "packmeter.container" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $prefix := ternary "packmeter-" "" .sidecar -}}
name: packmeter
image: {{ include "packmeter.image" $root | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
command: ["/usr/local/bin/packmeter"]
args: ["serve", "--config", "/etc/packmeter/packmeter.toml"]
{{- if and .sidecar $v.sidecar.native }}
# Native sidecar (Kubernetes >= 1.29): starts before the gateway and is
# stopped only after the gateway has exited.
restartPolicy: Always
{{- end }}
ports:
  - name: {{ $prefix }}grpc
    containerPort: {{ int $v.config.grpcPort }}
    protocol: TCP
    {{- if and (eq $v.mode "daemonset") $v.daemonset.hostPort.enabled }}
    hostPort: {{ int $v.daemonset.hostPort.grpc }}
    {{- end }}
  - name: {{ $prefix }}admin
    containerPort: {{ int $v.config.adminPort }}
    protocol: TCP
    {{- if and (eq $v.mode "daemonset") $v.daemonset.hostPort.enabled (gt (int $v.daemonset.hostPort.admin) 0) }}
    hostPort: {{ int $v.daemonset.hostPort.admin }}
    {{- end }}
env:
  - name: RUST_LOG
    value: {{ $v.config.logLevel | quote }}
  {{- if eq $v.store.type "postgres" }}
  # The URL carries a password: it comes from a Secret, and env overrides the TOML.
  - name: PACKMETER_STORE
    valueFrom:
      secretKeyRef:
        name: {{ include "packmeter.storeSecretName" $root }}
        key: {{ $v.store.postgres.secretKey }}
  # The root filesystem is read-only. A final flush the database refused is
  # written to the spill file $XDG_DATA_HOME/packmeter/postgres-HOST-PORT-DB.unflushed
  # and replayed at the next start, so the data directory is the data volume.
  - name: XDG_DATA_HOME
    value: {{ $v.persistence.mountPath | quote }}
  {{- else }}
  # SQLite spills big sorts to temp files; the root filesystem is read-only,
  # so point them at the writable data directory.
  - name: SQLITE_TMPDIR
    value: {{ $v.persistence.mountPath | quote }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if $v.probes.startup.enabled }}
startupProbe:
  {{- include "packmeter.probe" (dict "root" $root "probe" $v.probes.startup "check" $v.probes.readiness) | nindent 2 }}
{{- end }}
{{- if $v.probes.liveness.enabled }}
livenessProbe:
  {{- include "packmeter.probe" (dict "root" $root "probe" $v.probes.liveness "check" $v.probes.liveness) | nindent 2 }}
{{- end }}
{{- if $v.probes.readiness.enabled }}
readinessProbe:
  {{- include "packmeter.probe" (dict "root" $root "probe" $v.probes.readiness "check" $v.probes.readiness) | nindent 2 }}
{{- end }}
{{- if gt (int $v.preStop.sleepSeconds) 0 }}
lifecycle:
  # Keep serving while endpoints deregister; SIGTERM (drain + flush) follows.
  preStop:
    {{- if $v.preStop.nativeSleep }}
    sleep:
      seconds: {{ int $v.preStop.sleepSeconds }}
    {{- else }}
    exec:
      command: ["/bin/sleep", "{{ int $v.preStop.sleepSeconds }}"]
    {{- end }}
{{- end }}
{{- with $v.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: packmeter-config
    mountPath: /etc/packmeter
    readOnly: true
  - name: packmeter-data
    mountPath: {{ $v.persistence.mountPath }}
  {{- if $v.adminToken.existingSecret }}
  # The whole directory, not a subPath: the kubelet swaps in a rotated
  # Secret and packmeter re-reads the file without a restart.
  - name: packmeter-admin-token
    mountPath: {{ $v.adminToken.mountPath }}
    readOnly: true
  {{- end }}
  {{- if $v.tls.existingSecret }}
  # The whole directory: the kubelet swaps in a renewed certificate and
  # packmeter picks it up without a restart.
  - name: packmeter-tls
    mountPath: {{ $v.tls.mountPath }}
    readOnly: true
  {{- end }}
  {{- with $v.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The pod's volumes (config + data). */}}
{{- define "packmeter.volumes" -}}
{{- $v := .Values -}}
{{- $p := include "packmeter.persistenceType" . -}}
- name: packmeter-config
  configMap:
    name: {{ include "packmeter.fullname" . }}
{{- if $v.adminToken.existingSecret }}
- name: packmeter-admin-token
  secret:
    secretName: {{ $v.adminToken.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.adminToken.secretKey }}
        path: {{ $v.adminToken.secretKey }}
{{- end }}
{{- if $v.tls.existingSecret }}
- name: packmeter-tls
  secret:
    secretName: {{ $v.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- if $v.tls.clientAuth }}
      - key: ca.crt
        path: ca.crt
      {{- end }}
{{- end }}
- name: packmeter-data
  {{- if eq $p "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "packmeter.pvcName" . }}
  {{- else if eq $p "hostPath" }}
  hostPath:
    path: {{ $v.persistence.hostPath.path }}
    type: {{ $v.persistence.hostPath.type }}
  {{- else }}
  emptyDir:
    {{- with $v.persistence.emptyDir.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with $v.persistence.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
  {{- end }}
{{- end -}}

{{/*
Init container that hands a hostPath directory to the non-root user. It is the
only thing in the chart that runs as root, and only with CAP_CHOWN.
*/}}
{{- define "packmeter.chownInitContainer" -}}
{{- $v := .Values -}}
- name: data-permissions
  image: {{ include "packmeter.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command: ["/bin/chown", "-R", "{{ int $v.securityContext.runAsUser }}:{{ int $v.securityContext.runAsGroup }}", {{ $v.persistence.mountPath | quote }}]
  securityContext:
    runAsNonRoot: false
    runAsUser: 0
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
      add: ["CHOWN"]
    seccompProfile:
      type: RuntimeDefault
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  volumeMounts:
    - name: packmeter-data
      mountPath: {{ $v.persistence.mountPath }}
{{- end -}}

{{/*
checkov skip annotations for the workload, one per securityScanSkips entry
(values.yaml says why each finding is accepted).
*/}}
{{- define "packmeter.scanSkips" -}}
{{- range $i, $skip := .Values.securityScanSkips }}
checkov.io/skip{{ add1 $i }}: {{ printf "%s=%s" $skip.id $skip.reason | quote }}
{{- end }}
{{- end -}}

{{/* Pod spec shared by the Deployment and the DaemonSet. */}}
{{- define "packmeter.podSpec" -}}
{{- $v := .Values -}}
serviceAccountName: {{ include "packmeter.serviceAccountName" . }}
automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
# Service links would inject PACKMETER_SERVICE_HOST, PACKMETER_PORT, ... for a
# Service named "packmeter", right in the binary's PACKMETER_* env namespace.
enableServiceLinks: false
terminationGracePeriodSeconds: {{ include "packmeter.terminationGracePeriodSeconds" . }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if and (eq (include "packmeter.persistenceType" .) "hostPath") $v.persistence.hostPath.chown }}
initContainers:
  {{- include "packmeter.chownInitContainer" . | nindent 2 }}
{{- end }}
containers:
  - {{ include "packmeter.container" (dict "root" . "sidecar" false) | indent 4 | trim }}
volumes:
  {{- include "packmeter.volumes" . | nindent 2 }}
  {{- with $v.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template metadata: the config checksum rolls pods when the TOML changes. */}}
{{- define "packmeter.podMetadata" -}}
labels:
  {{- include "packmeter.selectorLabels" . | nindent 2 }}
  {{- with .Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
  {{- if and (eq .Values.store.type "postgres") (not .Values.store.postgres.existingSecret) }}
  checksum/store-secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
  {{- end }}
  {{- with .Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}
