# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A loopback server that replays realistic EC2 and Auto Scaling API pages for large fleets.

moto's DescribeInstances takes minutes at 10,000 instances, so the inventory
benchmark serves 10,000 and 50,000 instances from here. The answers are the
pages moto recorded (benchmarks/inventory/recorded/*.xml) with per-instance
values filled in, plus the fields a real DescribeInstances answer carries and
moto leaves out (instance profile, key name, security group, CPU, metadata,
maintenance, boot mode, platform details...), so an instance item is about
4.5 KB of XML as on AWS.

It answers, per region (taken from the SigV4 credential scope; a region
without a fleet answers AuthFailure like a region the account has not opted
into):

- autoscaling DescribeAutoScalingGroups: AutoScalingGroupNames, Filters
  (tag:KEY, tag-key, tag-value), MaxRecords (default 50, max 100), NextToken;
- ec2 DescribeInstances: InstanceId.N (all in one page, unknown ids give
  InvalidInstanceID.NotFound as AWS does; MaxResults with ids is refused),
  or Filter.N (instance-state-name, instance-id, tag-key, tag:KEY) with
  MaxResults (5..1000; 1000 when absent) and NextToken;
- ec2 DescribeLaunchTemplates: LaunchTemplateId.N.

Every call waits ``latency_ms`` first and is counted by region and operation.
Pages are built on demand from per-instance XML fragments made once.
"""

from __future__ import annotations

import collections
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lab.awsemu import error_body, service_of

OWNER = "123456789012"
ASG_TAG = "aws:autoscaling:groupName"

INSTANCE_ITEM = (
    "<item><reservationId>{reservation_id}</reservationId><ownerId>" + OWNER + "</ownerId><groupSet/>"
    "<instancesSet><item><architecture>x86_64</architecture><blockDeviceMapping><item><deviceName>/dev/xvda"
    "</deviceName><ebs><attachTime>2026-11-20T08:14:03.000Z</attachTime><deleteOnTermination>true"
    "</deleteOnTermination><status>attached</status><volumeId>{volume_id}</volumeId></ebs></item>"
    "</blockDeviceMapping><clientToken>{client_token}</clientToken><ebsOptimized>true</ebsOptimized>"
    "<enaSupport>true</enaSupport><hypervisor>xen</hypervisor><iamInstanceProfile><arn>arn:aws:iam::" + OWNER +
    ":instance-profile/{asg}-profile</arn><id>AIPA{profile_id}</id></iamInstanceProfile>"
    "<networkInterfaceSet><item><attachment><attachTime>2026-11-20T08:14:03.000Z</attachTime><attachmentId>"
    "eni-attach-{eni}</attachmentId><deleteOnTermination>true</deleteOnTermination><deviceIndex>0</deviceIndex>"
    "<status>attached</status><networkCardIndex>0</networkCardIndex></attachment><description/><groupSet><item>"
    "<groupId>sg-0f1e2d3c4b5a69788</groupId><groupName>{asg}-instances</groupName></item></groupSet>"
    "<ipv6AddressesSet/><macAddress>{mac}</macAddress><networkInterfaceId>eni-{eni}</networkInterfaceId><ownerId>"
    + OWNER + "</ownerId><privateDnsName>{private_dns}</privateDnsName><privateIpAddress>{private_ip}"
    "</privateIpAddress><privateIpAddressesSet><item><primary>true</primary><privateDnsName>{private_dns}"
    "</privateDnsName><privateIpAddress>{private_ip}</privateIpAddress></item></privateIpAddressesSet>"
    "<sourceDestCheck>true</sourceDestCheck><status>in-use</status><subnetId>{subnet_id}</subnetId><vpcId>"
    "{vpc_id}</vpcId><interfaceType>interface</interfaceType></item></networkInterfaceSet><rootDeviceName>"
    "/dev/xvda</rootDeviceName><rootDeviceType>ebs</rootDeviceType><groupSet><item><groupId>sg-0f1e2d3c4b5a69788"
    "</groupId><groupName>{asg}-instances</groupName></item></groupSet><sourceDestCheck>true</sourceDestCheck>"
    "<stateReason><code/><message/></stateReason><tagSet><item><key>aws:ec2launchtemplate:id</key><value>{lt_id}"
    "</value></item><item><key>aws:ec2launchtemplate:version</key><value>{lt_version}</value></item><item><key>"
    "Name</key><value>{asg}</value></item><item><key>Environment</key><value>production</value></item><item><key>"
    "fleetkeeper:fleet</key><value>{asg}</value></item><item><key>aws:autoscaling:groupName</key><value>{asg}"
    "</value></item></tagSet><virtualizationType>hvm</virtualizationType><cpuOptions><coreCount>1</coreCount>"
    "<threadsPerCore>2</threadsPerCore></cpuOptions><capacityReservationSpecification>"
    "<capacityReservationPreference>open</capacityReservationPreference></capacityReservationSpecification>"
    "<hibernationOptions><configured>false</configured></hibernationOptions><metadataOptions><state>applied"
    "</state><httpTokens>required</httpTokens><httpPutResponseHopLimit>2</httpPutResponseHopLimit><httpEndpoint>"
    "enabled</httpEndpoint><httpProtocolIpv6>disabled</httpProtocolIpv6><instanceMetadataTags>disabled"
    "</instanceMetadataTags></metadataOptions><enclaveOptions><enabled>false</enabled></enclaveOptions>"
    "<bootMode>uefi-preferred</bootMode><platformDetails>Linux/UNIX</platformDetails><usageOperation>RunInstances"
    "</usageOperation><usageOperationUpdateTime>2026-11-20T08:14:03.000Z</usageOperationUpdateTime>"
    "<privateDnsNameOptions><hostnameType>ip-name</hostnameType><enableResourceNameDnsARecord>false"
    "</enableResourceNameDnsARecord><enableResourceNameDnsAAAARecord>false</enableResourceNameDnsAAAARecord>"
    "</privateDnsNameOptions><maintenanceOptions><autoRecovery>default</autoRecovery></maintenanceOptions>"
    "<currentInstanceBootMode>uefi</currentInstanceBootMode><networkPerformanceOptions><bandwidthWeighting>default"
    "</bandwidthWeighting></networkPerformanceOptions><operator><managed>false</managed></operator>"
    "<instanceId>{instance_id}</instanceId><imageId>ami-0c7217cdde317cfec</imageId><instanceState><code>16</code>"
    "<name>running</name></instanceState><privateDnsName>{private_dns}</privateDnsName><dnsName/><reason/>"
    "<keyName>fleet-admin</keyName><amiLaunchIndex>0</amiLaunchIndex><productCodes/><instanceType>m7g.large"
    "</instanceType><launchTime>2026-11-20T08:14:03.000Z</launchTime><placement><groupName/><tenancy>default"
    "</tenancy><availabilityZone>{az}</availabilityZone></placement><monitoring><state>disabled</state>"
    "</monitoring><subnetId>{subnet_id}</subnetId><vpcId>{vpc_id}</vpcId><privateIpAddress>{private_ip}"
    "</privateIpAddress></item></instancesSet></item>"
)

INSTANCES_PAGE = (
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstancesResponse "
    "xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{request_id}</requestId><reservationSet>"
    "{items}</reservationSet>{next_token}</DescribeInstancesResponse>"
)

ASG_MEMBER = (
    "<member><InstanceId>{instance_id}</InstanceId><InstanceType>m7g.large</InstanceType><AvailabilityZone>{az}"
    "</AvailabilityZone><LifecycleState>{lifecycle}</LifecycleState><HealthStatus>Healthy</HealthStatus>"
    "<LaunchTemplate><LaunchTemplateId>{lt_id}</LaunchTemplateId><LaunchTemplateName>{asg}-lt</LaunchTemplateName>"
    "<Version>{lt_version}</Version></LaunchTemplate><ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>"
)

ASG_GROUP = (
    "<member><AutoScalingGroupName>{asg}</AutoScalingGroupName><AutoScalingGroupARN>arn:aws:autoscaling:{region}:"
    + OWNER + ":autoScalingGroup:5f0a1c2e-0000-4000-8000-{serial:012d}:autoScalingGroupName/{asg}"
    "</AutoScalingGroupARN><LaunchTemplate><LaunchTemplateId>{lt_id}</LaunchTemplateId><LaunchTemplateName>"
    "{asg}-lt</LaunchTemplateName><Version>$Latest</Version></LaunchTemplate><MinSize>0</MinSize><MaxSize>"
    "{max_size}</MaxSize><DesiredCapacity>{size}</DesiredCapacity><DefaultCooldown>300</DefaultCooldown>"
    "<AvailabilityZones>{azs}</AvailabilityZones><LoadBalancerNames/><TargetGroupARNs/><HealthCheckType>ELB"
    "</HealthCheckType><HealthCheckGracePeriod>300</HealthCheckGracePeriod><Instances>{members}</Instances>"
    "<CreatedTime>2026-11-20T08:10:00.000Z</CreatedTime><SuspendedProcesses/><VPCZoneIdentifier>{subnets}"
    "</VPCZoneIdentifier><EnabledMetrics/><Tags><member><ResourceId>{asg}</ResourceId><ResourceType>"
    "auto-scaling-group</ResourceType><Key>fleetkeeper:fleet</Key><Value>{asg}</Value><PropagateAtLaunch>true"
    "</PropagateAtLaunch></member><member><ResourceId>{asg}</ResourceId><ResourceType>auto-scaling-group"
    "</ResourceType><Key>Environment</Key><Value>production</Value><PropagateAtLaunch>true</PropagateAtLaunch>"
    "</member></Tags><TerminationPolicies><member>Default</member></TerminationPolicies>"
    "<NewInstancesProtectedFromScaleIn>false</NewInstancesProtectedFromScaleIn><ServiceLinkedRoleARN>"
    "arn:aws:iam::" + OWNER + ":role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"
    "</ServiceLinkedRoleARN><CapacityRebalance>false</CapacityRebalance></member>"
)

ASG_PAGE = (
    "<DescribeAutoScalingGroupsResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">"
    "<DescribeAutoScalingGroupsResult><AutoScalingGroups>{groups}</AutoScalingGroups>{next_token}"
    "</DescribeAutoScalingGroupsResult><ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
    "</DescribeAutoScalingGroupsResponse>"
)

TEMPLATE_ITEM = (
    "<item><launchTemplateId>{lt_id}</launchTemplateId><launchTemplateName>{asg}-lt</launchTemplateName>"
    "<createTime>2026-11-01T10:00:00.000Z</createTime><createdBy>arn:aws:iam::" + OWNER + ":root</createdBy>"
    "<defaultVersionNumber>1</defaultVersionNumber><latestVersionNumber>2</latestVersionNumber><tagSet/></item>"
)
TEMPLATES_PAGE = (
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeLaunchTemplatesResponse "
    "xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{request_id}</requestId><launchTemplates>"
    "{items}</launchTemplates></DescribeLaunchTemplatesResponse>"
)


class Instance:
    __slots__ = ("instance_id", "asg", "region", "tags", "xml", "member_xml")


class RegionFleet:
    """The instances and groups of one region, with their XML fragments."""

    def __init__(self, region: str, region_index: int, instances: int, groups: int, drift_every: int = 10):
        self.region = region
        self.groups = collections.OrderedDict()  # name -> [Instance]
        self.instances = {}
        self.order = []
        azs = [f"{region}a", f"{region}b", f"{region}c"]
        subnets = {az: f"subnet-{region_index:02x}{n:015x}" for n, az in enumerate(azs)}
        vpc = f"vpc-{region_index:02x}{7:015x}"
        for g in range(groups):
            name = f"fleet-{region_index}-{g:04d}"
            self.groups[name] = []
        names = list(self.groups)
        for k in range(instances):
            g = k % groups
            asg = names[g]
            az = azs[k % 3]
            serial = (region_index << 24) | k
            inst = Instance()
            inst.instance_id = f"i-{serial:017x}"
            inst.asg = asg
            inst.region = region
            inst.tags = {ASG_TAG: asg, "Name": asg, "Environment": "production", "fleetkeeper:fleet": asg}
            ip = f"10.{region_index}.{(k // 250) % 256}.{k % 250 + 4}"
            values = {
                "reservation_id": f"r-{serial:017x}", "instance_id": inst.instance_id, "asg": asg, "az": az,
                "volume_id": f"vol-{serial:017x}", "client_token": f"fleet-{serial:032x}",
                "profile_id": f"{serial:017X}", "eni": f"{serial:017x}",
                "mac": "02:%02x:%02x:%02x:%02x:%02x" % tuple((serial >> s) & 0xFF for s in (32, 24, 16, 8, 0)),
                "private_ip": ip, "private_dns": f"ip-{ip.replace('.', '-')}.{region}.compute.internal",
                "subnet_id": subnets[az], "vpc_id": vpc, "lt_id": f"lt-{(region_index << 16) | g:017x}",
                "lt_version": "1" if drift_every and k % drift_every == 0 else "2",
                "lifecycle": "InService",
            }
            inst.xml = INSTANCE_ITEM.format(**values)
            inst.member_xml = ASG_MEMBER.format(**values)
            self.groups[asg].append(inst)
            self.instances[inst.instance_id] = inst
            self.order.append(inst)
        self.group_xml = {}
        for g, (name, members) in enumerate(self.groups.items()):
            self.group_xml[name] = ASG_GROUP.format(
                asg=name, region=region, serial=(region_index << 16) | g, lt_id=f"lt-{(region_index << 16) | g:017x}",
                size=len(members), max_size=max(1, len(members) * 2),
                azs="".join(f"<member>{az}</member>" for az in azs), subnets=",".join(subnets.values()),
                members="".join(m.member_xml for m in members),
            )
        self.template_xml = {
            f"lt-{(region_index << 16) | g:017x}": TEMPLATE_ITEM.format(lt_id=f"lt-{(region_index << 16) | g:017x}", asg=name)
            for g, name in enumerate(self.groups)
        }
        self.group_tags = {name: {"fleetkeeper:fleet": name, "Environment": "production"} for name in self.groups}


class ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _indexed(form, prefix):
    """Values of PREFIX.1, PREFIX.2, ... in order."""
    values = []
    n = 1
    while f"{prefix}.{n}" in form:
        values.append(form[f"{prefix}.{n}"])
        n += 1
    return values


def _filters(form, prefix, name_key, value_prefix):
    filters = []
    n = 1
    while f"{prefix}.{n}.{name_key}" in form:
        filters.append((form[f"{prefix}.{n}.{name_key}"], _indexed(form, f"{prefix}.{n}.{value_prefix}")))
        n += 1
    return filters


def _matches(tags, instance_id, filters):
    for name, values in filters:
        if name == "instance-state-name":
            if "running" not in values:
                return False
        elif name == "instance-id":
            if instance_id not in values:
                return False
        elif name == "tag-key":
            if not any(v in tags for v in values):
                return False
        elif name.startswith("tag:"):
            if tags.get(name[4:]) not in values:
                return False
        else:
            raise ApiError(400, "InvalidParameterValue", f"The filter '{name}' is invalid")
    return True


class ReplayState:
    def __init__(self, fleets: dict, latency_ms: float = 0.0):
        self.fleets = fleets
        self.latency = latency_ms / 1000.0
        self.lock = threading.Lock()
        self.calls = collections.Counter()
        self.request_serial = 0

    def request_id(self):
        with self.lock:
            self.request_serial += 1
            return f"00000000-0000-4000-8000-{self.request_serial:012d}"

    # --- operations -------------------------------------------------------------------
    def describe_instances(self, fleet: RegionFleet, form):
        ids = _indexed(form, "InstanceId")
        filters = _filters(form, "Filter", "Name", "Value")
        if ids:
            if "MaxResults" in form:
                raise ApiError(400, "InvalidParameterCombination",
                               "The parameter instancesSet cannot be used with the parameter maxResults")
            missing = [i for i in ids if i not in fleet.instances]
            if missing:
                raise ApiError(400, "InvalidInstanceID.NotFound",
                               f"The instance IDs '{', '.join(missing)}' do not exist")
            selected = [fleet.instances[i] for i in ids if _matches(fleet.instances[i].tags, i, filters)]
            return INSTANCES_PAGE.format(request_id=self.request_id(), items="".join(i.xml for i in selected),
                                         next_token="")
        size = int(form.get("MaxResults", 1000))
        if not 5 <= size <= 1000:
            raise ApiError(400, "InvalidParameterValue", "MaxResults must be between 5 and 1000")
        start = int(form.get("NextToken", "0") or 0)
        selected = []
        position = start
        order = fleet.order
        while position < len(order) and len(selected) < size:
            inst = order[position]
            position += 1
            if _matches(inst.tags, inst.instance_id, filters):
                selected.append(inst)
        token = f"<nextToken>{position}</nextToken>" if position < len(order) else ""
        return INSTANCES_PAGE.format(request_id=self.request_id(), items="".join(i.xml for i in selected),
                                     next_token=token)

    def describe_auto_scaling_groups(self, fleet: RegionFleet, form):
        names = _indexed(form, "AutoScalingGroupNames.member")
        filters = _filters(form, "Filters.member", "Name", "Values.member")
        size = int(form.get("MaxRecords", 50))
        if not 1 <= size <= 100:
            raise ApiError(400, "ValidationError", "MaxRecords must be between 1 and 100")
        candidates = names or list(fleet.groups)
        selected = []
        for name in candidates:
            if name not in fleet.groups:
                continue
            tags = fleet.group_tags[name]
            ok = True
            for fname, values in filters:
                if fname == "tag-key":
                    ok = any(v in tags for v in values)
                elif fname == "tag-value":
                    ok = any(v in tags.values() for v in values)
                elif fname.startswith("tag:"):
                    ok = tags.get(fname[4:]) in values
                else:
                    raise ApiError(400, "ValidationError", f"Filter name {fname} is invalid")
                if not ok:
                    break
            if ok:
                selected.append(name)
        start = int(form.get("NextToken", "0") or 0)
        page = selected[start:start + size]
        token = f"<NextToken>{start + size}</NextToken>" if start + size < len(selected) else ""
        return ASG_PAGE.format(groups="".join(fleet.group_xml[n] for n in page), next_token=token,
                               request_id=self.request_id())

    def describe_launch_templates(self, fleet: RegionFleet, form):
        ids = _indexed(form, "LaunchTemplateId")
        if not ids:
            ids = list(fleet.template_xml)
        unknown = [i for i in ids if i not in fleet.template_xml]
        if unknown:
            raise ApiError(400, "InvalidLaunchTemplateId.NotFound", f"Launch template {unknown[0]} does not exist")
        return TEMPLATES_PAGE.format(request_id=self.request_id(), items="".join(fleet.template_xml[i] for i in ids))


OPERATIONS = {
    ("ec2", "DescribeInstances"): ReplayState.describe_instances,
    ("ec2", "DescribeLaunchTemplates"): ReplayState.describe_launch_templates,
    ("autoscaling", "DescribeAutoScalingGroups"): ReplayState.describe_auto_scaling_groups,
}


def _region_of(headers):
    auth = headers.get("Authorization", "")
    if "Credential=" in auth:
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
        if len(scope) >= 5:
            return scope[2]
    return None


def _make_handler(state: ReplayState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002
            return

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8") if length else ""
            form = {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
            service = service_of(self.headers)
            region = _region_of(self.headers)
            operation = form.get("Action", "")
            if state.latency:
                time.sleep(state.latency)
            with state.lock:
                state.calls[(region, service, operation)] += 1
            try:
                handler = OPERATIONS.get((service, operation))
                if handler is None:
                    raise ApiError(400, "InvalidAction", f"{service}:{operation} is not replayed")
                fleet = state.fleets.get(region)
                if fleet is None:
                    raise ApiError(401, "AuthFailure", "AWS was not able to validate the provided access credentials")
                payload = handler(state, fleet, form).encode("utf-8")
                status = 200
            except ApiError as exc:
                payload = error_body(service, exc.code, exc.message)[0]
                status = exc.status
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST  # noqa: N815

    return Handler


class ReplayServer:
    """``ReplayServer({"us-east-1": (instances, groups)}, latency_ms=50).start()``; ``endpoint_url``."""

    def __init__(self, layout: dict, latency_ms: float = 0.0, drift_every: int = 10):
        fleets = {region: RegionFleet(region, n, instances, groups, drift_every)
                  for n, (region, (instances, groups)) in enumerate(sorted(layout.items()))}
        self.state = ReplayState(fleets, latency_ms)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self.state))
        self.server.daemon_threads = True
        self.thread = None

    @property
    def endpoint_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ReplayServer":
        self.thread = threading.Thread(target=self.server.serve_forever, name="replay", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self.state.lock:
            self.state.calls.clear()

    def summary(self) -> dict:
        """{"service:Operation": count} over all regions."""
        counter = collections.Counter()
        for (_region, service, operation), count in self.state.calls.items():
            counter[f"{service}:{operation}"] += count
        return dict(sorted(counter.items()))

    def total_calls(self) -> int:
        return sum(self.state.calls.values())

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
