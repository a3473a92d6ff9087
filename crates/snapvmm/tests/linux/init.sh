#!/bin/busybox sh
# /init of the Linux guest in tests/linux_guests.rs (busybox, Debian's stock
# kernel and modules). The scenario comes from the kernel command line:
# snaptest=boot|args|reboot|powerdown|disk|diskbench|pci|mem|files|net|vsock.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /mnt
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mode=$(sed -n 's/.*snaptest=\([a-z]*\).*/\1/p' /proc/cmdline)
load() { for m in "$@"; do insmod /modules/$m.ko || echo "GUEST-ERROR insmod $m"; done; }
# The transports: virtio-mmio (snapvmm), and virtio-pci where there is a PCI
# bus (the same guest under QEMU, for the side-by-side benchmarks).
transports() {
    load virtio virtio_ring virtio_mmio
    [ -d /sys/bus/pci/devices ] && [ -n "$(ls /sys/bus/pci/devices)" ] && load virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
}
echo "GUEST-UP mode=$mode nproc=$(nproc) uptime=$(cut -d' ' -f1 /proc/uptime)"
grep -q LNRO0005 /sys/bus/acpi/devices/*/hid 2>/dev/null && echo "GUEST-ACPI virtio-mmio devices: $(cat /sys/bus/acpi/devices/*/hid | grep -c LNRO0005)"
off() { sync; echo "GUEST-POWEROFF"; poweroff -f; sleep 30; echo "GUEST-ERROR still running after poweroff"; }
case "$mode" in
boot)
    echo "GUEST-CPUS online=$(cat /sys/devices/system/cpu/online)"
    echo "GUEST-CLOCK $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    # The console: the host types a line, the shell runs it.
    echo "GUEST-SHELL"
    setsid cttyhack sh
    off ;;
args)
    # Booted with another VMM's guide's arguments: what takes the serial
    # interrupt (XT-PIC under noapic, IO-APIC otherwise), whether a virtio
    # disk reads (its interrupts arrive), then the console.
    echo "GUEST-SERIAL-IRQ $(grep ttyS0 /proc/interrupts | tr -s ' ')"
    if grep -q LNRO0005 /sys/bus/acpi/devices/*/hid 2>/dev/null; then
        load virtio virtio_ring virtio_mmio virtio_blk
        for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
        if dd if=/dev/vda of=/dev/null bs=64k count=64 2>/dev/null; then
            echo "GUEST-VDA read ok"
        else
            echo "GUEST-ERROR cannot read /dev/vda"
        fi
    fi
    echo "GUEST-SHELL"
    setsid cttyhack sh
    off ;;
reboot)
    # The host says whether to reboot again (the count cannot live in RAM).
    echo "GUEST-REBOOT-READY"
    read -r what
    if [ "$what" = again ]; then
        echo "GUEST-REBOOT"
        reboot -f
    fi
    /stress mem 64 &
    echo "GUEST-SHELL"
    setsid cttyhack sh ;;
powerdown)
    load evdev button
    /stress powerkey && off
    echo "GUEST-ERROR no power button event" ;;
disk|files)
    load virtio virtio_ring virtio_mmio virtio_blk crc16 mbcache jbd2 crc32c_generic ext4
    for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
    ls /dev/vd* 2>/dev/null | sed 's/^/GUEST-DISK /'
    if [ "$mode" = disk ]; then
        for d in vda vdb; do
            # Write-zeroes and discard with Linux's driver (it enabled both):
            # the last 4 MiB made random, zeroed (BLKZEROOUT) and read back as
            # zeroes, then discarded.
            q=/sys/block/$d/queue
            [ "$(cat $q/write_zeroes_max_bytes)" -gt 0 ] && [ "$(cat $q/discard_max_bytes)" -gt 0 ] ||
                echo "GUEST-ERROR $d: write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes) discard_max_bytes=$(cat $q/discard_max_bytes)"
            dd if=/dev/urandom of=/dev/$d bs=1M count=4 seek=60 oflag=direct 2>/dev/null
            if /stress zeroout /dev/$d 62914560 4194304 &&
                [ "$(dd if=/dev/$d bs=1M skip=60 count=4 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; then
                echo "GUEST-ZEROED $d"
            else
                echo "GUEST-ERROR write-zeroes on $d"
            fi
            blkdiscard -o 62914560 -l 4194304 /dev/$d && echo "GUEST-DISCARDED $d" || echo "GUEST-ERROR discard on $d"
            mke2fs -q /dev/$d && mount -t ext2 /dev/$d /mnt || { echo "GUEST-ERROR cannot use /dev/$d"; continue; }
            for i in 0 1 2 3; do /stress content $i > /mnt/f$i; done
            sync
            fstrim /mnt && echo "GUEST-TRIMMED $d" || echo "GUEST-ERROR fstrim on $d"
            umount /mnt
            mount -t ext2 -o ro /dev/$d /mnt && (cd /mnt && sha256sum f0 f1 f2 f3 | sed "s/^/GUEST-SUM $d /") && umount /mnt
        done
    else
        # Formatted only once: a restored guest finds the filesystem it made.
        [ -e /formatted ] || { mke2fs -q /dev/vda && touch /formatted; }
        mount -t ext2 /dev/vda /mnt && /stress files /mnt 60 && umount /mnt && echo "GUEST-UMOUNTED"
    fi
    off ;;
net)
    # The NIC with Linux's own driver; the host side is 10.0.2.1 on its tap.
    transports; load failover net_failover virtio_net
    for i in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.2; done
    ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || echo "GUEST-ERROR no eth0"
    ip link set lo up
    echo "GUEST-NET mac=$(cat /sys/class/net/eth0/address) features=$(cat /sys/class/net/eth0/device/features)"
    echo "GUEST-SHELL"
    setsid cttyhack sh ;;
diskbench)
    # Issue 23's table with 1 vCPU: O_DIRECT dd on /dev/vda (raw) and /dev/vdb
    # (qcow2), timed by the guest (/proc/uptime, 10 ms), and the request sizes
    # the driver allows. With 2 vCPUs: 4 KiB reads unpinned and from each vCPU
    # (which vCPU takes the completion interrupt matters), and one vCPU
    # computing beside the other's I/O.
    transports; load virtio_blk
    for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] && break; sleep 0.2; done
    up() { cut -d' ' -f1 /proc/uptime | tr -d .; }
    timed() { s=$(up); "$@" 2>/dev/null || echo "GUEST-ERROR $*"; e=$(up); echo $(( (e - s) * 10 )); }
    if [ "$(nproc)" -eq 1 ]; then
        for d in vda vdb; do
            echo "DISKBENCH-QUEUE dev=$d max_segments=$(cat /sys/block/$d/queue/max_segments) max_sectors_kb=$(cat /sys/block/$d/queue/max_sectors_kb)"
            for round in 1 2; do
                for t in "write-1M oflag=direct of=/dev/$d if=/dev/zero bs=1M count=64" \
                         "read-1M iflag=direct if=/dev/$d of=/dev/null bs=1M count=64" \
                         "write-4K oflag=direct of=/dev/$d if=/dev/zero bs=4k count=2048" \
                         "read-4K iflag=direct if=/dev/$d of=/dev/null bs=4k count=2048"; do
                    echo "DISKBENCH dev=$d test=${t%% *} round=$round ms=$(timed dd ${t#* })"
                done
            done
        done
    else
        r4k="dd iflag=direct if=/dev/vda of=/dev/null bs=4k count=2048"
        echo "DISKBENCH dev=vda test=read-4K-2vcpus round=1 ms=$(timed $r4k)"
        for c in 1 2; do
            echo "DISKBENCH dev=vda test=read-4K-on-cpumask-$c round=1 ms=$(timed taskset $c $r4k)"
        done
        echo "DISKBENCH-IRQS $(grep -E 'virtio|LNRO' /proc/interrupts | tr -s ' ' | tr '\n' ';')"
        # One vCPU computes while the other streams 1 MiB direct reads: the
        # computing one must not be held up by the other's I/O.
        echo "DISKBENCH-MIXED phase=alone $(taskset 2 /stress spin 3000)"
        taskset 1 sh -c 'while :; do dd iflag=direct if=/dev/vda of=/dev/null bs=1M count=64 2>/dev/null; done' &
        r=$!
        sleep 0.5
        echo "DISKBENCH-MIXED phase=with-io $(taskset 2 /stress spin 3000)"
        kill $r; killall dd 2>/dev/null; wait
    fi
    echo "DISKBENCH-DONE"
    off ;;
pci)
    # The disks on virtio-pci (--virtio-transport pci): PCI functions, a
    # request queue per vCPU, MSI-X vectors; a file system made, written and
    # read back on each; then memory stress and the console.
    transports; load virtio_blk crc16 mbcache jbd2 crc32c_generic ext4
    for i in $(seq 1 50); do [ -b /dev/vdb ] && break; sleep 0.2; done
    echo "GUEST-PCI functions=$(ls /sys/bus/pci/devices | wc -l) vda_queues=$(ls /sys/block/vda/mq | wc -l) msi_vectors=$(grep -i msi /proc/interrupts | grep -c virtio) mmio=$(cat /sys/bus/acpi/devices/*/hid | grep -c LNRO0005)"
    for d in vda vdb; do
        mke2fs -q /dev/$d && mount -t ext2 /dev/$d /mnt || { echo "GUEST-ERROR cannot use /dev/$d"; continue; }
        for i in 0 1; do /stress content $i > /mnt/f$i; done
        umount /mnt
        mount -t ext2 -o ro /dev/$d /mnt && (cd /mnt && sha256sum f0 f1 | sed "s/^/GUEST-SUM $d /") && umount /mnt
    done
    /stress mem 64 &
    echo "GUEST-SHELL"
    setsid cttyhack sh ;;
vsock)
    # The vsock device with Linux's own driver; an echo listener on port 5000.
    load vsock vmw_vsock_virtio_transport_common virtio virtio_ring virtio_mmio vmw_vsock_virtio_transport
    /stress vsock-echo 5000 &
    echo "GUEST-SHELL"
    setsid cttyhack sh ;;
mem)
    /stress mem 64 &
    # A shell on the console too: a restored guest must still take typed input.
    echo "GUEST-SHELL"
    setsid cttyhack sh ;;
*)
    echo "GUEST-ERROR unknown mode '$mode'" ;;
esac
