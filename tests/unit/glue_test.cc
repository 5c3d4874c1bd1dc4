// protobuf-c <-> gRPC byte buffer glue.
#include <gtest/gtest.h>

#include <cerrno>
#include <string>
#include <vector>

extern "C" {
#include "glue.h"
#include "forkd/v1/forkd.pb-c.h"
#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
}

namespace {

grpc_byte_buffer *BufferFromSlices(const std::vector<std::string> &parts)
{
    std::vector<grpc_slice> slices;
    for (const auto &part : parts)
        slices.push_back(grpc_slice_from_copied_buffer(part.data(), part.size()));
    grpc_byte_buffer *buffer = grpc_raw_byte_buffer_create(slices.data(), slices.size());
    for (auto &slice : slices)
        grpc_slice_unref(slice);
    return buffer;
}

std::string Encode(const ProtobufCMessage *message)
{
    std::string bytes(protobuf_c_message_get_packed_size(message), '\0');
    protobuf_c_message_pack(message, reinterpret_cast<uint8_t *>(bytes.data()));
    return bytes;
}

}  // namespace

TEST(Glue, PackThenUnpackKeepsEveryField)
{
    Forkd__V1__MachineConfig machine = FORKD__V1__MACHINE_CONFIG__INIT;
    machine.vcpu_count = 2;
    machine.mem_size_mib = 1024;
    Forkd__V1__BootRequest boot = FORKD__V1__BOOT_REQUEST__INIT;
    boot.name = const_cast<char *>("agent-7");
    boot.machine = &machine;
    boot.kernel_image_path = const_cast<char *>("/var/lib/guest.bin");
    boot.boot_args = const_cast<char *>("pages=100 pattern=random");

    grpc_byte_buffer *buffer = glue_pack(&boot.base);
    ASSERT_NE(nullptr, buffer);
    ProtobufCMessage *decoded = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, glue_unpack(&forkd__v1__boot_request__descriptor, buffer, &decoded, &err))
        << err.message;
    auto *back = reinterpret_cast<Forkd__V1__BootRequest *>(decoded);
    EXPECT_STREQ("agent-7", back->name);
    EXPECT_STREQ("/var/lib/guest.bin", back->kernel_image_path);
    EXPECT_STREQ("pages=100 pattern=random", back->boot_args);
    ASSERT_NE(nullptr, back->machine);
    EXPECT_EQ(2u, back->machine->vcpu_count);
    EXPECT_EQ(1024u, back->machine->mem_size_mib);
    protobuf_c_message_free_unpacked(decoded, nullptr);
    grpc_byte_buffer_destroy(buffer);
}

TEST(Glue, MessageSplitAcrossSlicesDecodes)
{
    Forkd__V1__GetVmRequest request = FORKD__V1__GET_VM_REQUEST__INIT;
    request.vm_id = const_cast<char *>("vm-with-a-reasonably-long-identifier");
    std::string bytes = Encode(&request.base);
    size_t half = bytes.size() / 2;
    grpc_byte_buffer *buffer = BufferFromSlices({bytes.substr(0, half), bytes.substr(half)});
    ProtobufCMessage *decoded = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, glue_unpack(&forkd__v1__get_vm_request__descriptor, buffer, &decoded, &err))
        << err.message;
    EXPECT_STREQ(request.vm_id, reinterpret_cast<Forkd__V1__GetVmRequest *>(decoded)->vm_id);
    protobuf_c_message_free_unpacked(decoded, nullptr);
    grpc_byte_buffer_destroy(buffer);
}

TEST(Glue, EmptyBufferIsTheDefaultMessage)
{
    grpc_byte_buffer *buffer = BufferFromSlices({""});
    ProtobufCMessage *decoded = nullptr;
    struct forkd_error err = {};
    ASSERT_EQ(0, glue_unpack(&forkd__v1__spawn_request__descriptor, buffer, &decoded, &err));
    auto *spawn = reinterpret_cast<Forkd__V1__SpawnRequest *>(decoded);
    EXPECT_EQ(0u, spawn->count);
    EXPECT_EQ(FORKD__V1__MEMORY_BACKEND__MEMORY_BACKEND_UNSPECIFIED, spawn->backend);
    protobuf_c_message_free_unpacked(decoded, nullptr);
    grpc_byte_buffer_destroy(buffer);
}

TEST(Glue, GarbageIsRejectedWithTheTypeName)
{
    // Field 1, wire type 2 (length-delimited) claiming 100 bytes that are not there.
    grpc_byte_buffer *buffer = BufferFromSlices({std::string("\x0a\x64\x01\x02", 4)});
    ProtobufCMessage *decoded = reinterpret_cast<ProtobufCMessage *>(0x1);
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, glue_unpack(&forkd__v1__get_vm_request__descriptor, buffer, &decoded, &err));
    EXPECT_EQ(nullptr, decoded);
    EXPECT_NE(nullptr, strstr(err.message, "forkd.v1.GetVmRequest")) << err.message;
    EXPECT_NE(nullptr, strstr(err.message, "4 bytes")) << err.message;
    grpc_byte_buffer_destroy(buffer);
}

TEST(Glue, WrongWireTypeForAKnownFieldIsRejected)
{
    // Field 2 of SpawnRequest (count, varint) sent as a fixed64.
    grpc_byte_buffer *buffer = BufferFromSlices({std::string("\x11\x01\x02\x03", 4)});
    ProtobufCMessage *decoded = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL, glue_unpack(&forkd__v1__spawn_request__descriptor, buffer, &decoded, &err));
    grpc_byte_buffer_destroy(buffer);
}

TEST(Glue, MissingMessageIsRejected)
{
    ProtobufCMessage *decoded = nullptr;
    struct forkd_error err = {};
    EXPECT_EQ(-EINVAL,
              glue_unpack(&forkd__v1__get_info_request__descriptor, nullptr, &decoded, &err));
    EXPECT_NE(nullptr, strstr(err.message, "no request message")) << err.message;
}
