{{/* Chart name, shortened to fit a DNS label. */}}
{{- define "cpupool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name. Kept to 45 characters so that suffixes such as "-webhook-tls"
still fit in a 63-character DNS label.
*/}}
{{- define "cpupool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cpupool.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels for every object. */}}
{{- define "cpupool.labels" -}}
helm.sh/chart: {{ include "cpupool.chart" . }}
app.kubernetes.io/name: {{ include "cpupool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cpupool
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of one component. Selectors of a DaemonSet or Deployment cannot change after
install, so they hold only these stable labels.
Call with (dict "ctx" $ "component" "agent").
*/}}
{{- define "cpupool.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cpupool.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects: the common ones plus the component. */}}
{{- define "cpupool.componentLabels" -}}
{{ include "cpupool.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cpupool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cpupool.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cpupool.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "cpupool.configMapName" -}}
{{- printf "%s-pools" (include "cpupool.fullname" .) }}
{{- end }}

{{- define "cpupool.webhook.name" -}}
{{- printf "%s-webhook" (include "cpupool.fullname" .) }}
{{- end }}

{{/* The Secret holding the webhook's tls.crt and tls.key, whichever TLS mode fills it. */}}
{{- define "cpupool.webhook.tlsSecretName" -}}
{{- if eq .Values.webhook.tls.mode "existingSecret" }}
{{- required "webhook.tls.existingSecret.name is required with webhook.tls.mode=existingSecret" .Values.webhook.tls.existingSecret.name }}
{{- else }}
{{- printf "%s-webhook-tls" (include "cpupool.fullname" .) }}
{{- end }}
{{- end }}

{{/* DNS names the API server may use for the webhook Service; the certificate covers all. */}}
{{- define "cpupool.webhook.dnsNames" -}}
{{- $svc := include "cpupool.webhook.name" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson }}
{{- end }}

{{/*
The pool config file. cpus is forced to a string: `--set pools.a.cpus=3` gives a number, and the
agent wants a cpu list.
*/}}
{{- define "cpupool.poolConfig" -}}
{{- $pools := dict }}
{{- range $name, $pool := .Values.pools }}
{{- $_ := set $pools $name (merge (dict "cpus" (toString $pool.cpus)) (omit $pool "cpus")) }}
{{- end }}
{{- dict "resourceBaseName" .Values.resourceBaseName "pools" $pools | toYaml }}
{{- end }}

{{/*
One node group's config file (poolconfig-<name>.yaml): its nodeSelector and pools, under the chart's
resourceBaseName (every file must use the same one). Called with (dict "ctx" . "group" $group).
*/}}
{{- define "cpupool.nodeGroupConfig" -}}
{{- $pools := dict }}
{{- range $name, $pool := .group.pools }}
{{- $_ := set $pools $name (merge (dict "cpus" (toString $pool.cpus)) (omit $pool "cpus")) }}
{{- end }}
{{- $selector := dict }}
{{- range $key, $value := .group.nodeSelector }}
{{- $_ := set $selector $key (toString $value) }}
{{- end }}
{{- dict "resourceBaseName" .ctx.Values.resourceBaseName "nodeSelector" $selector "pools" $pools | toYaml }}
{{- end }}

{{/*
"true" when the agent reads its Node's labels from the API (node groups, or asked for): it then gets a
service account token and read-only RBAC on nodes.
*/}}
{{- define "cpupool.agentReadsNodeLabels" -}}
{{- if or .Values.agent.readNodeLabels (gt (len .Values.nodeGroups) 0) -}}
true
{{- end -}}
{{- end }}

{{/*
The CEL expression of the webhook's matchCondition (see webhook-admission.yaml). Every optional field
is guarded with has(): an expression error would apply the failure policy to unrelated pods.
*/}}
{{- define "cpupool.webhook.matchExpression" -}}
{{- $prefix := printf "%s/" .Values.resourceBaseName -}}
{{- $key := printf "%s/cpus" .Values.resourceBaseName -}}
{{- $claim := printf "%s/claim-" .Values.resourceBaseName -}}
{{- $concerns := printf "(has(c.resources) && ((has(c.resources.limits) && c.resources.limits.exists(r, r.startsWith('%s'))) || (has(c.resources.requests) && c.resources.requests.exists(r, r.startsWith('%s'))))) || (has(c.env) && c.env.exists(e, e.name == 'EXCLUSIVE_CPUS' || e.name == 'SHARED_CPUS' || (e.name.startsWith('CPUPOOL_') && e.name.endsWith('_CPUS'))))" $prefix $prefix -}}
(has(object.metadata.annotations) && ('{{ $key }}' in object.metadata.annotations || object.metadata.annotations.exists(k, k.startsWith('{{ $claim }}')))) || object.spec.containers.exists(c, {{ $concerns }}) || (has(object.spec.initContainers) && object.spec.initContainers.exists(c, {{ $concerns }}))
{{- end }}

{{/*
The failure policy follows what reaches the webhook. With matchConditions only pods that ask for pools
(or forge their variables) are sent: Fail, because such a pod admitted unchanged would run unpinned
without anyone noticing. Without them every pod of the selected namespaces is sent: Ignore, because a
webhook outage must not stop every pod creation. An API server before 1.28 may drop matchConditions
(an alpha field in 1.27), so there the default is Ignore too. An explicit value wins.
*/}}
{{- define "cpupool.webhook.failurePolicy" -}}
{{- $narrow := and .Values.webhook.matchConditions (semverCompare ">=1.28-0" .Capabilities.KubeVersion.Version) -}}
{{- .Values.webhook.failurePolicy | default (ternary "Fail" "Ignore" $narrow) -}}
{{- end }}
