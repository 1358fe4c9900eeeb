# Issue 5's proof: what the guest's IOMMU driver did (iommu.sh), then the passed-through NVMe's
# read and write checks (nvme-pt.sh), with the device behind the IOMMU.
. /tb/actions/iommu.sh
. /tb/actions/nvme-pt.sh
